"""Text corpora: where documents come from.

A corpus yields `Document`s in a fixed order, so a harvest that restarts sees exactly the same
sequence of documents and can skip what it already stored.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_CORPORA = ("stdlib-docs", "python-code")
STDLIB_DOCS_MAX_CHARS = 1_000_000
"""The built-in corpus stops at about 1 MB of text."""
MIN_DOC_CHARS = 40
"""Shorter built-in documents (docstrings, paragraphs) are left out."""
_KEEP_PERCENT = 66
"""Share of docstrings kept (by a hash of their qualified name) so the 1 MB spans the whole stdlib."""
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "turtledemo",
}


PYTHON_CODE_MAX_DOC_CHARS = 16_000
"""`python-code` cuts longer files at line boundaries into documents of at most this many characters."""
_CODE_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
"""Never walked into: bytecode, and the installed packages under the stdlib (walked as their own root)."""


HF_PREFIX = "hf:"
"""`--corpus hf:NAME[:CONFIG[:SPLIT]]`: a Hugging Face dataset by name (or a local dataset folder)."""


class CorpusError(ValueError):
    """A corpus argument that cannot be read."""


@dataclass(frozen=True)
class Document:
    """One unit of text that is never packed together with another."""

    text: str
    """Plain text; empty for chat documents."""
    source: str
    """Where it came from: a file and line, a module path, a dataset row."""
    messages: tuple[dict[str, str], ...] = field(default=())
    """Chat turns (`role`, `content`) for chat corpora."""


@dataclass(frozen=True)
class CorpusSpec:
    """What to read; stored in the harvest config so a resume can check it is the same."""

    corpus: str
    """`stdlib-docs` or `python-code` (built in), a path to a .txt/.jsonl/.parquet file or a saved `datasets` directory, or
    `hf:NAME[:CONFIG[:SPLIT]]` (a Hugging Face dataset, streamed; from the local cache when offline)."""
    text_column: str = "text"
    """Column with the text in JSONL, Parquet and datasets corpora."""
    doc_per_line: bool = True
    """Plain text: one document per line (True) or the whole file as one document."""
    chat: bool = False
    """JSONL chat corpus: each row has a `messages` list rendered with the model's chat template."""

    def describe(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus,
            "text_column": self.text_column,
            "doc_per_line": self.doc_per_line,
            "chat": self.chat,
        }


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Documents of a corpus, in a deterministic order."""
    if spec.corpus == "stdlib-docs":
        yield from stdlib_docs()
        return
    if spec.corpus == "python-code":
        yield from python_code()
        return
    if spec.corpus.startswith(HF_PREFIX):
        yield from _hf_dataset(spec.corpus, spec.text_column)
        return
    path = Path(spec.corpus).expanduser()
    if not path.exists():
        raise CorpusError(
            f"corpus {spec.corpus!r} is neither a built-in ({', '.join(BUILTIN_CORPORA)}) nor an existing path; "
            "pass a .txt, .jsonl or .parquet file, or a folder written by datasets.save_to_disk"
        )
    if path.is_dir():
        yield from _datasets_dir(path, spec.text_column)
    elif spec.chat:
        yield from _chat_jsonl(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl(path, spec.text_column)
    elif path.suffix == ".parquet":
        yield from _parquet(path, spec.text_column)
    elif path.suffix in (".txt", ".md", ".text", ""):
        yield from _text(path, spec.doc_per_line)
    else:
        raise CorpusError(f"unsupported corpus file type {path.suffix!r}; use .txt, .jsonl or .parquet")


def corpus_size_chars(spec: CorpusSpec) -> int | None:
    """Rough size of a corpus in characters, for a progress ETA; None when unknown."""
    if spec.corpus == "stdlib-docs":
        return STDLIB_DOCS_MAX_CHARS
    path = Path(spec.corpus).expanduser()
    if path.is_file() and path.suffix in (".txt", ".md", ".text", ""):
        return path.stat().st_size
    return None


def stdlib_docs(max_chars: int = STDLIB_DOCS_MAX_CHARS) -> Iterator[Document]:
    """Docstrings of the Python standard library, read with `ast` (nothing is imported).

    Files are walked in sorted order and docstrings in source order, and a fixed hash of each
    qualified name picks about two thirds of them, so the corpus spans the whole library and is
    identical on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for qualname, doc in module_docstrings(tree, module):
            if len(doc) < MIN_DOC_CHARS or zlib.crc32(qualname.encode()) % 100 >= _KEEP_PERCENT:
                continue
            yield Document(text=doc, source=qualname)
            total += len(doc)
            if total >= max_chars:
                return


def python_code_roots() -> list[tuple[str, Path]]:
    """(label, folder) of the standard library and of the running environment's installed packages."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        folder = Path(paths[key])
        if folder.is_dir() and all(folder.resolve() != r.resolve() for _, r in roots):
            roots.append(("site-packages", folder))
    return roots


def python_code(
    max_doc_chars: int = PYTHON_CODE_MAX_DOC_CHARS, roots: list[tuple[str, Path]] | None = None
) -> Iterator[Document]:
    """Python source of the standard library and the installed packages (or of `roots`: (label,
    folder) pairs), one file at a time.

    The file paths are listed first (names only, in sorted order) and put in a fixed order by a hash
    of each path, so any prefix of the corpus (a 200k-token demo harvest) spans all packages rather
    than the first few stdlib modules by name. Streamed: each file is read only when its turn comes.
    A file longer than `max_doc_chars` becomes several documents cut at line boundaries. Files that
    are not UTF-8 and nearly empty documents are skipped; exact duplicate documents (by content hash)
    are kept once. The order and content depend only on the installed files, so two iterations, or a
    resumed harvest, see the same documents.
    """
    seen: set[bytes] = set()
    for name, path in python_code_files(python_code_roots() if roots is None else roots):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for lineno, piece in split_lines(text, max_doc_chars):
            if len(piece.strip()) < MIN_DOC_CHARS:
                continue
            digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=16).digest()
            if digest in seen:  # a copied file, or a copied stretch of a long one
                continue
            seen.add(digest)
            yield Document(text=piece, source=f"{name}:{lineno}")


def python_code_files(roots: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """(name, path) of every .py file under `roots`, name = label/relative path, in `python-code` order:
    by a hash of the name (ties, which need a hash collision, by name)."""
    files = [
        (f"{label}/{path.relative_to(root)}", path)
        for label, root in roots
        for path in _sorted_walk(root, ".py")
    ]
    return sorted(files, key=lambda f: (hashlib.blake2b(f[0].encode("utf-8"), digest_size=8).digest(), f[0]))


def python_code_fingerprint(roots: list[tuple[str, Path]] | None = None) -> str:
    """`N files, <hash of names and sizes>`: stored with a python-code harvest, so a resume after the
    installed packages changed (another order, other documents) is refused instead of mixing corpora."""
    digest = hashlib.blake2b(digest_size=8)
    files = python_code_files(python_code_roots() if roots is None else roots)
    for name, path in files:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{name}\t{size}\n".encode())
    return f"{len(files)} files, {digest.hexdigest()}"


def _sorted_walk(root: Path, suffix: str) -> Iterator[Path]:
    """Files under `root` ending in `suffix`, depth first in sorted name order, one folder listed at a
    time; symlinked folders are not followed (no loops, no file seen twice)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _CODE_SKIP_DIRS:
                    yield from _sorted_walk(Path(entry.path), suffix)
            elif entry.name.endswith(suffix) and entry.is_file():
                yield Path(entry.path)
        except OSError:
            continue


def split_lines(text: str, max_chars: int) -> Iterator[tuple[int, str]]:
    """(first line number, piece) of `text` cut at line boundaries into pieces of at most `max_chars`;
    a single longer line is cut inside itself."""
    piece: list[str] = []
    size = 0
    start = 1
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if size + len(line) > max_chars and piece:
            yield start, "".join(piece)
            piece, size, start = [], 0, lineno
        while len(line) > max_chars:
            yield lineno, line[:max_chars]
            line = line[max_chars:]
        piece.append(line)
        size += len(line)
    if piece:
        yield start, "".join(piece)


def module_docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a parsed module and of its classes and functions, breadth-first."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, prefix = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{child.name}"
                child_doc = ast.get_docstring(child, clean=True)
                if child_doc:
                    yield name, child_doc
                stack.append((child, name))


def _text(path: Path, doc_per_line: bool) -> Iterator[Document]:
    with path.open(encoding="utf-8") as fh:
        if not doc_per_line:
            yield Document(text=fh.read(), source=str(path))
            return
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if line.strip():
                yield Document(text=line, source=f"{path.name}:{lineno}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path}:{lineno} is not valid JSON ({err.msg}); fix or remove that line"
                ) from err


def _jsonl(path: Path, column: str) -> Iterator[Document]:
    for lineno, row in _jsonl_rows(path):
        if column not in row:
            raise CorpusError(
                f"{path}:{lineno} has no {column!r} field (fields: {', '.join(row)}); choose one with --text-column"
            )
        yield Document(text=str(row[column]), source=f"{path.name}:{lineno}")


def _chat_jsonl(path: Path) -> Iterator[Document]:
    for lineno, row in _jsonl_rows(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise CorpusError(
                f"{path}:{lineno}: a chat corpus needs a `messages` list of {{role, content}} objects"
            )
        turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)
        yield Document(text="", source=f"{path.name}:{lineno}", messages=turns)


def _parquet(path: Path, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path} has no column {column!r} (columns: {', '.join(pf.schema_arrow.names)}); choose one with --text-column"
        )
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                yield Document(text=str(text), source=f"{path.name}:{row}")


def _datasets_dir(path: Path, column: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError("reading a datasets folder needs `pip install datasets`") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if column not in ds.column_names:
        raise CorpusError(
            f"dataset {path} has no column {column!r} (columns: {', '.join(ds.column_names)}); choose one with --text-column"
        )
    for i, text in enumerate(ds[column]):
        if text:
            yield Document(text=str(text), source=f"{path.name}[{i}]")


def parse_hf(corpus: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` → (name, config or None, split; default "train")."""
    parts = corpus.removeprefix(HF_PREFIX).split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(
            f"cannot read {corpus!r}; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
            "(e.g. hf:stas/openwebtext-10k or hf:wikitext:wikitext-2-raw-v1:train; an empty CONFIG is allowed)"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _hf_offline() -> None:
    """Switch the hub off for this process so that `datasets` reads its cache instead of retrying."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _hf_dataset(corpus: str, column: str) -> Iterator[Document]:
    """Rows of a Hugging Face dataset, in the dataset's order.

    Online, hub datasets are streamed (nothing is downloaded up front). With the hub unreachable (or
    ``HF_HUB_OFFLINE=1``) the hub is switched off first, so a dataset in the local cache loads at once
    and one that is not fails at once with the fix, instead of after a minute of retries. NAME may also
    be a local folder: data files (loaded by `datasets.load_dataset`) or a `save_to_disk` folder.
    """
    import os

    from activations.models import hub_reachable

    name, config, split = parse_hf(corpus)
    try:
        import datasets
    except ImportError as err:
        raise CorpusError("hf: corpora need the datasets package: `pip install datasets`") from err
    local = Path(name).expanduser()
    if local.is_dir() and any(
        (local / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    ):
        yield from _datasets_dir(local, column)  # written by save_to_disk
        return
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not local.exists() and not offline and not hub_reachable():
        offline = True
    if offline:
        _hf_offline()
    try:
        ds = datasets.load_dataset(
            str(local) if local.exists() else name, config, split=split, streaming=not offline
        )
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError... by case
        if offline and not local.exists():
            raise CorpusError(
                f"dataset {name!r} (config {config}, split {split!r}) is not in the local Hugging Face cache and the "
                "hub is unreachable. Load it once where there is internet (datasets.load_dataset) and copy "
                "~/.cache/huggingface here, or save it with Dataset.save_to_disk(DIR) and pass --corpus DIR "
                f"(original error: {type(err).__name__}: {str(err)[:200]})"
            ) from err
        raise CorpusError(
            f"could not load dataset {name!r} (config {config}, split {split!r}): {err}"
        ) from err
    for i, row in enumerate(ds):
        if column not in row:
            raise CorpusError(
                f"dataset {name!r} has no column {column!r} (columns: {', '.join(row)}); choose one with --text-column"
            )
        text = row[column]
        if text:
            yield Document(text=str(text), source=f"{name}[{i}]")
