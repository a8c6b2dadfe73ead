"""The Python API for notebooks: one import, the CLI's typed configs, results as objects.

    import saewb
    from saewb import TopKConfig, TrainConfig

    saewb.harvest("ws.duckdb", model="minilm", hooks="blocks.2.hook_out", max_tokens=4000)
    run = saewb.train("ws.duckdb", TopKConfig(n_latents=256, k=8), TrainConfig(train_tokens=16_384),
                      hook="blocks.2.hook_out", name="quick")
    run.curves                      # the logged metric rows as a DataFrame
    saewb.evaluate("ws.duckdb", "quick")
    analysis = saewb.analyze("ws.duckdb", "quick")
    analysis.latent(3)              # its top contexts, tokens highlighted as the app draws them
    saewb.load("ws.duckdb", "quick").sae.encode(x)

Every function calls the code its `saewb` command calls (``sae.orchestrate.plan_from_values`` and
``run_plan``, ``sae.sweep``, ``activations.harvest.run_harvest``, ``analysis.evaluate.evaluate_run``,
``analysis.features.analyze_run``, ``analysis.autointerp.explain_selected``,
``analysis.interventions.intervene_run``), so the checks, the resume and the messages are the CLI's.
A bad argument raises ``UsageError`` (a ``ValueError``) whose message is the line `saewb` prints for
the same input; the original exception is its ``__cause__``. Progress follows ``saewb.progress``:
notebook bars in Jupyter, plain lines in a log.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activations.harvest import HarvestConfig
from analysis.autointerp import ExplainConfig
from analysis.features import AnalyzeConfig
from sae.configs import ARCH_CONFIGS, TrainConfig
from saewb.errors import UsageError
from saewb.progress import in_notebook, notebook_bars

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = [
    "Analysis",
    "Evaluation",
    "Explanations",
    "Fitted",
    "Harvest",
    "InterventionResult",
    "Latent",
    "Run",
    "Sweep",
    "analyze",
    "compare",
    "evaluate",
    "explain",
    "fit",
    "harvest",
    "intervene",
    "load",
    "sql",
    "sweep",
    "train",
]

PathLike = str | Path
if in_notebook():
    notebook_bars()  # the notebook bar class (saewb.progress), imported quietly before any library does
CURVES = ("fvu", "l0", "dead_frac")
"""The metric rows a run's HTML view draws against training tokens."""


@contextmanager
def _checked() -> Iterator[None]:
    """Re-raise what the CLI reports as one line (ValueError, FileNotFoundError) as ``UsageError``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise UsageError.of(err) from err


def _with_overrides(config: Any, cls: type, overrides: dict[str, Any]) -> Any:
    """``config`` (or the defaults of ``cls``) with keyword overrides; unknown names name the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"unknown {cls.__name__} option(s) {unknown}; valid options are {names}")
    # no config: build from the overrides, so defaults that depend on other fields (TrainConfig's batch
    # size on train_tokens) are resolved from the values given
    return cls(**overrides) if config is None else dataclasses.replace(config, **overrides)


def _frame(rows: Any) -> pd.DataFrame:
    """Rows (a list of dicts, or a dict of columns) as a DataFrame; pandas is imported on first use."""
    import pandas as pd

    return pd.DataFrame(rows)


def _pre(text: str) -> str:
    """A text table as notebook HTML, spacing kept."""
    return f"<pre>{html.escape(text)}</pre>"


# ---------------------------------------------------------------------------------------- harvest


@dataclasses.dataclass(repr=False)
class Harvest:
    """A harvest of a workspace: its name, size and hooks (``info``: ``activations.store.HarvestInfo``)."""

    workspace: Path
    info: Any
    """What the workspace records (``activations.store.HarvestInfo``: config, n_docs, tables, model, ...)."""
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)
    """Hook -> activation rows that were NaN/inf and stored as zeros (``nonfinite="skip"``)."""

    @property
    def name(self) -> str:
        """The harvest's name in the workspace."""
        return str(self.info.name)

    @property
    def n_tokens(self) -> int:
        """Tokens stored (special tokens included)."""
        return int(self.info.n_tokens)

    @property
    def hooks(self) -> dict[str, int]:
        """Hook name -> activation width d."""
        return dict(self.info.hooks)

    def activations(
        self, hook: str | None = None, *, split: str = "eval", max_rows: int = 4096, seed: int = 0
    ) -> np.ndarray:
        """Up to ``max_rows`` cached activations [rows, d] of ``hook`` (default: the only hook), from
        the held-out split (``split="eval"``) or the training split, in the trainer's shuffled order."""
        import numpy as np

        from activations.stream import ActivationStream

        if hook is None:
            if len(self.hooks) != 1:
                raise UsageError(f"harvest {self.name!r} has hooks {sorted(self.hooks)}; pass hook=")
            hook = next(iter(self.hooks))
        with _checked():
            stream = ActivationStream(
                self.workspace, hook, harvest=self.name, batch_size=max_rows, seed=seed, split=split
            )
            batch = next(iter(stream.epoch()), None)
        return np.zeros((0, self.hooks[hook]), np.float32) if batch is None else batch

    def __repr__(self) -> str:
        hooks = ", ".join(f"{h} (d={d})" for h, d in self.hooks.items())
        return (
            f"Harvest({self.name!r}: {self.info.n_tokens} tokens, {self.info.n_docs} documents, "
            f"hooks {hooks}, model {self.info.model!r}, in {self.workspace})"
        )


def harvest(
    workspace: PathLike, config: HarvestConfig | None = None, *, progress: bool = True, **options: Any
) -> Harvest:
    """Run a model over a corpus and store its activations at the hooks (`saewb harvest`).

    ``config``: a ``HarvestConfig``; ``options`` override its fields (``model``, ``corpus``,
    ``hooks`` — one name or several —, ``ctx_len``, ``max_tokens``, ...). Running the same call
    again resumes an interrupted harvest, or does nothing when it is complete.
    """
    from activations.harvest import check_shard, run_harvest
    from activations.store import nonfinite_counts
    from saewb.workspace import Workspace

    if isinstance(options.get("hooks"), str):
        options["hooks"] = (options["hooks"],)
    elif options.get("hooks") is not None:
        options["hooks"] = tuple(options["hooks"])
    cfg = _with_overrides(config, HarvestConfig, options)
    with _checked():
        if cfg.shard is not None:
            check_shard(tuple(cfg.shard))
        info = run_harvest(cfg, workspace, progress=progress)
    return Harvest(Path(workspace), info, nonfinite_counts(Workspace(workspace), info.name))


def sql(workspace: PathLike, query: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """Run one read-only SQL query on a workspace; its rows as a DataFrame.

    Every table is there (``tokens``, ``documents``, ``runs``, ``metrics``, ...), and every hook's
    activations as ``act__<harvest>__<hook>`` (``tok_idx BIGINT, x FLOAT[d]``, float32) whatever the
    layout: a view over the shard files (``activations.sql``, read on demand) or an old harvest's
    table. ``params`` fill the query's ``?`` placeholders. For Arrow or numpy results, or several
    queries on one connection, use ``activations.sql.activation_sql(workspace)`` (a short-lived
    read-only connection with the same views).
    """
    import duckdb

    from activations.sql import activation_sql
    from saewb.workspace import existing_workspace

    with _checked(), activation_sql(existing_workspace(workspace)) as con:
        try:
            return con.execute(query, list(params or [])).df()
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as err:
            first = str(err).splitlines()[0]
            raise UsageError(f"{first} (list the workspace's tables with SHOW TABLES)") from err


# ------------------------------------------------------------------------------------------ runs


class Run:
    """A training run of a workspace: its stored config, final metrics, logged curves and SAE.

    Attributes: ``workspace``, ``name``, ``status`` (running, done, failed, stopped), ``reason`` (why
    it failed), ``arch``, ``hook``, ``harvest``, ``config`` (the stored record: ``{"arch", "sae": {...},
    "train": {...}, "hook", "harvest"}``) and ``metrics`` (final: held-out ``fvu``, ``l0``, ... and
    ``train_*`` of the last training window). ``sae`` (loaded on first use) has ``encode`` / ``decode``; ``encode`` and ``decode`` here are
    shortcuts to it. ``analysis()`` and ``evaluations()`` read what `analyze` / `evaluate` stored.
    """

    def __init__(self, workspace: PathLike, row: dict[str, Any]) -> None:
        self.workspace = Path(workspace)
        self.name: str = row["name"]
        self.status: str = row["status"]
        self.arch: str = row["arch"]
        self.hook: str | None = row.get("hook")
        self.harvest: str | None = row.get("harvest")
        self.config: dict[str, Any] = row.get("config") or {}
        self.metrics: dict[str, Any] = row.get("final_metrics") or {}
        self.reason: str | None = row.get("reason")
        self._sae: Any = None
        self._curves: pd.DataFrame | None = None

    @property
    def sae_config(self) -> Any:
        """The architecture's config (``TopKConfig``, ...), as trained."""
        return ARCH_CONFIGS[self.arch](**self.config.get("sae", {}))

    @property
    def train_config(self) -> TrainConfig:
        """The trainer's config, as trained (execution fields such as the mesh at their defaults)."""
        from sae.base import saved_config  # imports JAX: only when asked

        return saved_config(TrainConfig, self.config.get("train", {}))

    @property
    def curves(self) -> pd.DataFrame:
        """The logged metric rows (step, tokens, loss, fvu, l0, dead_frac, lr, ...), one per log window."""
        if self._curves is None:
            from sae import runs
            from saewb.workspace import Workspace

            self._curves = _frame(runs.run_metrics(Workspace(self.workspace), self.name))
        return self._curves

    @property
    def sae(self) -> Any:
        """The trained SAE (``sae.api.SAE``: ``encode``, ``decode``, ``decoder_directions``)."""
        if self._sae is None:
            import sae as sae_pkg

            with _checked():
                self._sae = sae_pkg.load(self.name, workspace=self.workspace)
        return self._sae

    def encode(self, x: Any, k: int | None = None) -> Any:
        """Latent activations [tokens, n_latents] of raw activations [tokens, d] (``SAE.encode``)."""
        return self.sae.encode(x, k=k)

    def decode(self, f: Any) -> Any:
        """Reconstruction [tokens, d] from latents [tokens, n_latents] (``SAE.decode``)."""
        return self.sae.decode(f)

    def evaluations(self) -> list[Evaluation]:
        """Every stored `evaluate` result of this run, oldest first."""
        from analysis.evaluate import list_evals

        return [Evaluation(self.name, e["metrics"]) for e in list_evals(self.workspace, self.name, "eval")]

    def analysis(self) -> Analysis:
        """The stored analysis of this run (`analyze` first)."""
        return _open_analysis(self.workspace, self.name)

    def _shown_metrics(self) -> dict[str, float]:
        keys = ("fvu", "l0", "dead_frac", "train_fvu")
        return {k: self.metrics[k] for k in keys if isinstance(self.metrics.get(k), int | float)}

    def __repr__(self) -> str:
        shown = " ".join(f"{k}={v:.4g}" for k, v in self._shown_metrics().items())
        reason = f" ({self.reason})" if self.reason and self.status == "failed" else ""
        return f"Run({self.name!r}, {self.arch} on {self.hook}, {self.status}{reason}: {shown})"

    def _repr_html_(self) -> str:
        cells = "".join(f"<td><b>{html.escape(k)}</b> {v:.4g}</td>" for k, v in self._shown_metrics().items())
        head = (
            f"<div><b>run {html.escape(self.name)}</b>: {html.escape(self.arch)} on "
            f"<code>{html.escape(str(self.hook))}</code>, {html.escape(self.status)}</div>"
        )
        curves = self.curves
        plots = "".join(
            svg_curve(curves["tokens"].tolist(), curves[c].tolist(), c)
            for c in CURVES
            if len(curves) and c in curves
        )
        return f"{head}<table><tr>{cells}</tr></table><div style='display:flex;gap:12px'>{plots}</div>"


def svg_curve(
    xs: Sequence[float], ys: Sequence[float], label: str, width: int = 220, height: int = 120
) -> str:
    """One metric against training tokens as an inline SVG line (no plotting library)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y == y]  # NaN-free
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = 18

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        py = height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    line = " ".join(at(x, y) for x, y in pts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'style="font:10px sans-serif"><title>{html.escape(label)} vs training tokens</title>'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" '
        f'stroke="#d4d4d8"/><polyline fill="none" stroke="#ea580c" stroke-width="1.5" points="{line}"/>'
        f'<text x="{pad}" y="12">{html.escape(label)}: {y1:.4g} max, {pts[-1][1]:.4g} last</text>'
        f'<text x="{pad}" y="{height - 4}">tokens 0..{x1:,.0f}</text></svg>'
    )


def _find_run(workspace: PathLike, name: str | None) -> Run:
    """Run ``name`` of an existing workspace (None: its newest finished run), as the CLI finds it."""
    from analysis.runs import find_run
    from sae import runs
    from saewb.workspace import existing_workspace

    ws = existing_workspace(workspace)
    if name is None:
        name = runs.newest_done_run(ws)
        if name is None:
            raise ValueError(
                f"no finished run in {ws.path}; train one with `saewb train --workspace {ws.path} ...`"
            )
    return Run(ws.path, find_run(ws, name))


def load(workspace: PathLike, run: str | None = None) -> Run:
    """A run of a workspace by name (default: the newest finished run), with its SAE loaded."""
    with _checked():
        out = _find_run(workspace, run)
        _ = out.sae  # load now: a missing or broken checkpoint is reported here
    return out


def _config_values(config: Any) -> dict[str, Any]:
    """A config dataclass as the option values `saewb train` / a sweep file would give."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def train(
    workspace: PathLike | Sequence[PathLike],
    sae: Any = None,
    config: TrainConfig | None = None,
    *,
    hook: str | None = None,
    name: str | None = None,
    arch: str | None = None,
    harvest: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Run:
    """Train (or resume) an SAE on a harvested hook (`saewb train`); returns the finished run.

    ``sae``: an architecture config (``TopKConfig(n_latents=..., k=...)``, ... ; its ``arch`` is
    used unless ``arch=`` is given); ``config``: a ``TrainConfig``. ``options``: any `saewb train`
    option by its field name (``n_latents``, ``k``, ``train_tokens``, ``batch_size``, ``lr``,
    ``eval_tokens``, ``d_in``, ``wandb``, ...), overriding both configs. Every check runs before any
    work; the same ``name`` with the same config resumes from its last checkpoint.
    ``workspace``: one workspace, or a list whose first item is the workspace that holds the run.
    """
    from sae.orchestrate import plan_from_values, run_plan

    values: dict[str, Any] = {}
    if config is not None:
        values.update(_config_values(config))
    if sae is not None:
        values.update(_config_values(sae))
        values["arch"] = sae.arch
    values.update(options)
    given = {"workspace": workspace, "hook": hook, "name": name, "arch": arch, "harvest": harvest}
    values.update({k: v for k, v in given.items() if v is not None})
    values["progress"] = progress
    if isinstance(values["workspace"], list | tuple):
        values["workspace"] = [str(w) for w in values["workspace"]]
    elif "workspace" in values:
        values["workspace"] = str(values["workspace"])
    with _checked():
        plan = plan_from_values(values)
        run_plan(plan)
        return _find_run(plan.workspace, plan.name)


@dataclasses.dataclass(repr=False)
class Fitted:
    """An SAE trained on in-memory data (``fit``): the trainer's result, with no workspace behind it."""

    result: Any
    """The trainer's ``TrainResult`` (params in inference form, config, history, final metrics)."""

    @property
    def sae(self) -> Any:
        """The inference form (``encode`` / ``decode``), as ``load`` gives for a workspace run."""
        from sae.api import SAE

        r = self.result
        return SAE(
            r.config, r.params, r.arch_state, r.d, r.final_metrics, r.run_dir, r.history, r.outlier_cutoff
        )

    @property
    def params(self) -> Any:
        return self.result.params

    @property
    def metrics(self) -> dict[str, float]:
        """The final training-window metrics (fvu, l0, dead_frac, ...)."""
        return dict(self.result.final_metrics)

    @property
    def curves(self) -> pd.DataFrame:
        """The logged metric rows (step, tokens, loss, fvu, l0, ...) as a DataFrame."""
        return _frame(self.result.history)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if k in ("fvu", "l0", "dead_frac"))
        return (
            f"Fitted({self.result.config.arch}, n {self.result.config.n_latents}, d {self.result.d}: {shown})"
        )

    def _repr_html_(self) -> str:
        curves = self.curves
        plots = "".join(
            svg_curve(curves["tokens"], curves[c], c) for c in CURVES if len(curves) and c in curves
        )
        return f"<b>{html.escape(repr(self))}</b><div style='display:flex;gap:12px'>{plots}</div>"


def array_batches(data: np.ndarray, batch_size: int, seed: int) -> Any:
    """``batches(start)`` over an in-memory [rows, d] array: each epoch a fresh permutation of the rows,
    a function of (seed, epoch) alone, so a resumed run reads the same batches."""
    import numpy as np

    rows = len(data)
    per_epoch = max(1, rows // batch_size)

    def batches(start: int) -> Iterator[np.ndarray]:
        step = start
        while True:
            epoch, i = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(rows)
            yield np.ascontiguousarray(data[order[i * batch_size : (i + 1) * batch_size]], dtype=np.float32)
            step += 1

    return batches


def fit(
    data: Any,
    sae: Any,
    config: TrainConfig | None = None,
    *,
    run_dir: PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> Fitted:
    """Train an SAE on in-memory data, without a workspace (as sparsify's ``Trainer(cfg, data).fit()``).

    ``data``: a float [rows, d] array (shuffled into batches per epoch), or a function ``batches(start)``
    returning an iterator of [batch_size, d] arrays from batch ``start`` on (deterministic, so a run
    resumes). ``sae``: an architecture config; ``config``: a ``TrainConfig``; ``options``: TrainConfig
    fields overriding it. With ``run_dir``, checkpoints go there and the same call resumes.
    """
    import numpy as np

    from sae.trainer import train as train_sae

    with _checked():
        tc = _with_overrides(config or TrainConfig(), TrainConfig, options)
        if callable(data):
            batches = data
        else:
            data = np.asarray(data)
            if data.ndim != 2 or not np.issubdtype(data.dtype, np.floating):
                raise ValueError(
                    f"fit's data must be a float array [rows, d] or a batches(start) function, got "
                    f"{data.dtype} {data.shape}; pass activations as rows, e.g. x.reshape(-1, d)"
                )
            if len(data) < tc.batch_size:
                raise ValueError(
                    f"fit's data has {len(data)} rows, fewer than batch_size {tc.batch_size}; "
                    "pass more rows or a smaller batch_size"
                )
            batches = array_batches(data, tc.batch_size, tc.seed)
        return Fitted(train_sae(sae, tc, batches, run_dir=run_dir, progress=progress))


@dataclasses.dataclass(repr=False)
class Sweep:
    """A sweep's members as runs (``runs``: name -> Run; empty after a dry run) and their final metrics."""

    name: str
    members: list[str]
    """Member run names, in the sweep's order."""
    runs: dict[str, Run]

    @property
    def table(self) -> pd.DataFrame:
        """One row per member run: arch, hook and its final metrics."""
        return _frame(
            [
                {"run": r.name, "arch": r.arch, "hook": r.hook, **r._shown_metrics()}
                for r in self.runs.values()
            ]
        )

    def __repr__(self) -> str:
        return f"Sweep({self.name!r}, {len(self.members)} members, {len(self.runs)} trained)"

    def _repr_html_(self) -> str:
        return f"<div><b>sweep {html.escape(self.name)}</b></div>" + self.table.to_html(index=False)


def sweep(
    workspace: PathLike | Sequence[PathLike],
    *,
    name: str,
    train: TrainConfig | dict[str, Any],
    defaults: dict[str, Any] | None = None,
    grid: dict[str, Sequence[Any]] | None = None,
    members: Sequence[dict[str, Any]] | None = None,
    hook: str | None = None,
    arch: str | None = None,
    harvest: str | None = None,
    eval_tokens: int | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> Sweep:
    """Train many SAEs in lockstep on one pass over the activations (`saewb sweep`).

    The arguments are the sweep file's keys (see `saewb sweep --help`): ``train`` (a ``TrainConfig``
    or its fields) is shared, ``defaults`` / ``grid`` / ``members`` set the members' architecture
    fields. Each member becomes an ordinary run named ``<name>-<member>``; running the same sweep
    again resumes it. ``dry_run``: check everything and list the members, train nothing.
    """
    from sae.sweep import plan_sweep, run_sweep

    train_values = _config_values(train) if isinstance(train, TrainConfig) else dict(train)
    values: dict[str, Any] = {
        "workspace": [str(w) for w in workspace] if isinstance(workspace, list | tuple) else str(workspace),
        "name": name,
        "train": train_values,
        "progress": progress,
    }
    optional = {
        "defaults": defaults,
        "grid": grid,
        "members": list(members) if members is not None else None,
        "hook": hook,
        "arch": arch,
        "harvest": harvest,
        "eval_tokens": eval_tokens,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    with _checked():
        plan = plan_sweep(values)
        names = [m.name for m in plan.members]
        if dry_run:
            return Sweep(plan.name, names, {})
        run_sweep(plan)
        return Sweep(plan.name, names, {n: _find_run(plan.workspace, n) for n in names})


# ------------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass(repr=False)
class Evaluation:
    """`saewb eval`'s metrics of a run (docs/metrics.md): reconstruction, and CE/KL (causal LMs) or
    embedding cosine / neighbour overlap (encoders) with the SAE spliced in."""

    run: str
    metrics: dict[str, Any]
    """Metric name -> value, as stored in the ``evals`` table (also ``evaluation["fvu"]``)."""

    @property
    def frame(self) -> pd.DataFrame:
        """The metrics as a two-column DataFrame (metric, value), reference-sheet metrics first."""
        from analysis.evaluate import METRIC_ORDER

        keys = [k for k in METRIC_ORDER if k in self.metrics]
        keys += [
            k
            for k in self.metrics
            if k not in keys and k not in ("run", "hook", "harvest", "model_kind", "documents")
        ]
        return _frame({"metric": keys, "value": [self.metrics[k] for k in keys]})

    @property
    def documents(self) -> pd.DataFrame:
        """The held-out documents the splice costs most (``evaluate(documents=N)``): source, targets,
        clean CE, ΔCE and share of the excess loss; empty when not asked for."""
        cols = ["doc_id", "source", "targets", "ce_clean", "delta_ce", "share"]
        return _frame({c: [d.get(c) for d in self.metrics.get("documents", [])] for c in cols})

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __repr__(self) -> str:
        from analysis.evaluate import format_table

        return f"Evaluation of run {self.run!r}\n{format_table(self.metrics)}"

    def _repr_html_(self) -> str:
        out = f"<div><b>evaluation of run {html.escape(self.run)}</b></div>" + self.frame.to_html(index=False)
        if self.metrics.get("documents"):
            out += "<div><b>costliest held-out documents</b></div>" + self.documents.to_html(index=False)
        return out


def evaluate(
    workspace: PathLike,
    run: str,
    *,
    max_seqs: int = 64,
    targets: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    random_error: bool = False,
    documents: int = 0,
    dead_over_train: bool = False,
    model: Any = None,
    model_name: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a run on held-out documents and store the result (`saewb eval`).

    ``downstream=False``: reconstruction metrics only (no model run). ``model``: a TransformerBridge
    already loaded (else the harvest's model, or ``model_name``); ``max_seqs`` held-out windows are
    run through it, ``batch_size`` at a time, or with ``targets`` as few windows as hold that many
    next-token targets, spread over the whole held-out split (CE/KL on ≥ 100k targets tells two SAEs
    apart; 64 windows rarely do). ``random_error``:
    also the ΔCE of an error of the SAE's size in a random direction, and ``error_pathology`` = ΔCE /
    that (how much more the SAE's errors cost than their size explains). ``documents`` = N: the N
    held-out documents the splice costs most, as ``Evaluation.documents``. ``dead_over_train``: also
    ``dead_train_split``, the latents that fire on no token of the whole train split.
    """
    from analysis.evaluate import evaluate_run

    with _checked():
        out = evaluate_run(
            workspace,
            run,
            model=model,
            model_name=model_name,
            max_seqs=max_seqs,
            targets=targets,
            batch_size=batch_size,
            downstream=downstream,
            random_error=random_error,
            documents=documents,
            dead_over_train=dead_over_train,
            progress=progress,
        )
    return Evaluation(run, out)


def compare(
    workspace: PathLike,
    runs: Sequence[str],
    *,
    max_seqs: int = 64,
    targets: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    random_error: bool = False,
    dead_over_train: bool = False,
    model: Any = None,
    model_name: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate several runs of one hook on the same held-out tokens (`saewb eval RUN RUN ...`) and
    store each evaluation. One row per run; for causal LMs ``delta_ce_diff`` is its ΔCE minus the first
    run's on identical targets and ``delta_ce_diff_ci95`` the half-width of its 95% interval."""
    from analysis.evaluate import COMPARE_COLUMNS, evaluate_runs

    with _checked():
        outs = evaluate_runs(
            workspace,
            list(runs),
            model=model,
            model_name=model_name,
            max_seqs=max_seqs,
            targets=targets,
            batch_size=batch_size,
            downstream=downstream,
            random_error=random_error,
            dead_over_train=dead_over_train,
            progress=progress,
        )
    cols = ["run", *(c for c in COMPARE_COLUMNS if any(c in o for o in outs))]
    cols += [c for c in ("delta_ce_diff", "delta_ce_diff_ci95", "lm_targets") if any(c in o for o in outs)]
    return _frame([{c: o.get(c) for c in cols} for o in outs])


# -------------------------------------------------------------------------------------- analysis


@dataclasses.dataclass(repr=False)
class Latent:
    """One analysed latent: its statistics, top contexts, decoder neighbours, co-firing latents and family.

    In a notebook it shows its top contexts with the tokens shaded by activation, as the app does.
    """

    run: str
    latent: int
    stats: dict[str, Any]
    """Its row of ``Analysis.latents``: n_fires, freq, mean_act, max_act, hist, family, logit effect."""
    contexts: list[Any]
    """Top activating contexts (``analysis.tables.Context``: tokens, acts, value, doc_id, center)."""
    neighbors: list[tuple[int, float]]
    """Nearest latents by decoder cosine: (latent, cosine)."""
    cooccurring: list[Any]
    """Top co-firing latents: (latent, count, count / min(fires))."""
    family: list[dict[str, Any]]
    """Its feature family (``analysis.families``): latent, parent, depth, weight per member."""

    def __repr__(self) -> str:
        s = self.stats
        lines = [
            f"latent {self.latent} of {self.run!r}: fires on {s['freq'] or 0:.2%} of tokens, "
            f"mean {s['mean_act'] or 0:.3g}, max {s['max_act'] or 0:.3g}"
        ]
        for c in self.contexts:
            words = " ".join(f"[{t}:{a:.1f}]" if a > 0 else t for t, a in zip(c.tokens, c.acts, strict=True))
            lines.append(f"{c.value:7.3f}  {words}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from analysis.render import contexts_html

        s = self.stats
        head = (
            f"<div><b>latent {self.latent}</b> of {html.escape(self.run)}: fires on {s['freq'] or 0:.2%} "
            f"of tokens, mean {s['mean_act'] or 0:.3g}, max {s['max_act'] or 0:.3g}</div>"
        )
        near = ", ".join(f"{i} ({c:.2f})" for i, c in self.neighbors[:5])
        return f"{head}{contexts_html(self.contexts, float(s['max_act'] or 1.0))}<div>nearest: {near}</div>"


class Analysis:
    """A run's stored analysis (`saewb analyze`): ``latents`` is the per-latent table (n_fires, freq,
    mean_act, max_act, hist, family, logit effect), ``latent(i)`` one latent with its contexts."""

    def __init__(self, workspace: PathLike, run: str, summary: dict[str, Any]) -> None:
        self.workspace = Path(workspace)
        self.run = run
        self.summary = summary
        """What `analyze` reported (tokens, seconds, alive latents, families), or the stored record."""
        self._latents: pd.DataFrame | None = None

    @property
    def latents(self) -> pd.DataFrame:
        """One row per latent (``analysis.tables.latent_summary``)."""
        if self._latents is None:
            from analysis import tables

            self._latents = _frame(tables.latent_summary(self.workspace, self.run))
        return self._latents

    def latent(self, latent: int, *, window: int = 8, limit: int | None = 10) -> Latent:
        """Latent ``latent``: statistics, top ``limit`` contexts with ``window`` tokens either side,
        neighbours, co-firing latents and family."""
        from analysis import tables

        ws = self.workspace
        with _checked():
            return Latent(
                self.run,
                int(latent),
                tables.latent_summary(ws, self.run, int(latent))[0],
                tables.top_contexts(ws, self.run, int(latent), window=window, limit=limit),
                tables.neighbors(ws, self.run, int(latent)),
                tables.cooccurring(ws, self.run, int(latent)),
                tables.family_of(ws, self.run, int(latent)),
            )

    def search(self, token: str, limit: int = 20) -> pd.DataFrame:
        """The latents that peak on ``token`` (``analysis.tables.search_by_token``)."""
        from analysis import tables

        with _checked():
            return _frame(tables.search_by_token(self.workspace, self.run, token, limit=limit))

    def __repr__(self) -> str:
        alive = int((self.latents["n_fires"] > 0).sum()) if len(self.latents) else 0
        return f"Analysis of run {self.run!r}: {alive}/{len(self.latents)} latents fire"

    def _repr_html_(self) -> str:
        cols = ["latent", "n_fires", "freq", "mean_act", "max_act", "family"]
        top = self.latents[cols].sort_values("n_fires", ascending=False).head(10)
        return f"<div><b>{html.escape(repr(self))}</b> (most frequent)</div>" + top.to_html(index=False)


def _open_analysis(workspace: PathLike, run: str) -> Analysis:
    from analysis import tables

    with _checked():
        return Analysis(workspace, run, tables.analysis_info(workspace, run))


def analyze(
    workspace: PathLike,
    run: str,
    config: AnalyzeConfig | None = None,
    *,
    progress: bool = True,
    **options: Any,
) -> Analysis:
    """Analyse every latent of a run over its harvest and store the tables (`saewb analyze`).

    ``config``: an ``AnalyzeConfig``; ``options`` override its fields (``top_n``, ``max_tokens``,
    ``logits``, ...).
    """
    from analysis.features import analyze_run

    cfg = _with_overrides(config, AnalyzeConfig, options)
    with _checked():
        return Analysis(workspace, run, analyze_run(workspace, run, cfg, progress=progress))


# ---------------------------------------------------------------------------- explain, intervene


@dataclasses.dataclass(repr=False)
class Explanations:
    """`saewb explain`'s result: counts and timings (``result``), the score summary as a DataFrame
    (``summary``) and the stored explanation of every explained latent (``texts``)."""

    run: str
    result: dict[str, Any]
    """What `saewb explain --json` prints: selected, explained, skipped_done, failures, seconds, summary, ..."""
    texts: dict[int, str]
    """Latent -> its stored LLM explanation (every explained latent of the run)."""

    @property
    def summary(self) -> pd.DataFrame:
        """Mean score per scorer and explainer, with its 95% interval (``analysis.autointerp.summarize``)."""
        return _frame(self.result["summary"])

    def __repr__(self) -> str:
        from analysis.autointerp import format_summary

        r = self.result
        return (
            f"Explanations of run {self.run!r}: {r['explained']} explained ({r['skipped_done']} already done), "
            f"{r['failures']} failures\n{format_summary(r['summary'])}"
        )

    def _repr_html_(self) -> str:
        return _pre(repr(self))


def explain(
    workspace: PathLike,
    run: str,
    config: ExplainConfig | None = None,
    *,
    latents: str | Sequence[int] | None = None,
    top_by: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    explainer_url: str | None = None,
    explainer_model: str | None = None,
    timeout_s: float = 60.0,
    batch_size: int = 16,
    redo: bool = False,
    backend: Any = None,
    progress: bool = True,
    **options: Any,
) -> Explanations:
    """Explain latents of an analysed run with an LLM and score the explanations (`saewb explain`).

    Pick the latents with ``latents`` (ids, or ranges like ``"0-99"``), ``top_by`` (``freq``,
    ``max-act``, ``mean-act``) with ``limit``, or ``sample``. The explainer is the built-in SmolLM2,
    an OpenAI-compatible server (``explainer_url`` and ``explainer_model``), or ``backend``.
    ``config``: an ``ExplainConfig``; ``options`` override its fields (``scorers``, ``seed``, ...).
    """
    from analysis.autointerp import explain_selected
    from analysis.explanations import explanation_texts

    if isinstance(options.get("scorers"), str):
        options["scorers"] = tuple(s.strip() for s in options["scorers"].split(",") if s.strip())
    cfg = _with_overrides(config, ExplainConfig, options)
    spec = latents if latents is None or isinstance(latents, str) else ",".join(str(int(i)) for i in latents)
    with _checked():
        out = explain_selected(
            workspace,
            run,
            cfg,
            latents=spec,
            top_by=top_by,
            limit=limit,
            sample=sample,
            explainer_url=explainer_url,
            explainer_model=explainer_model,
            timeout_s=timeout_s,
            batch_size=batch_size,
            redo=redo,
            progress=progress,
            backend=backend,
        )
        from saewb.workspace import Workspace

        texts = explanation_texts(Workspace(workspace), run)
    return Explanations(run, out, texts)


@dataclasses.dataclass(repr=False)
class InterventionResult:
    """An intervention's effect, clean vs edited: ``result`` is ``analysis.interventions.LMResult``
    (causal LMs: top next tokens, logit differences, generations) or ``SearchResult`` (encoders)."""

    run: str
    result: Any
    """``LMResult`` or ``SearchResult`` (``analysis.interventions``)."""

    @property
    def frame(self) -> pd.DataFrame:
        """Per prompt position the logit of the actual next token, clean vs edited (causal LMs), or
        the similarity to each candidate, clean vs edited (encoders)."""
        return _frame(getattr(self.result, "logit_diff", None) or getattr(self.result, "rows", []))

    def __repr__(self) -> str:
        from analysis.interventions import LMResult, format_lm_result, format_search

        r = self.result
        return format_lm_result(r) if isinstance(r, LMResult) else format_search(r)

    def _repr_html_(self) -> str:
        return _pre(repr(self))


def _groups(value: Any) -> list[tuple[int, ...]]:
    """Latent ids as the CLI's groups: 3, [3, 17] or [(3, 17), (5,)]."""
    if value is None:
        return []
    if isinstance(value, int):
        return [(value,)]
    items = list(value)
    if all(isinstance(i, int) for i in items):
        return [tuple(items)] if items else []
    return [(i,) if isinstance(i, int) else tuple(i) for i in items]


def _valued(value: Any) -> list[tuple[tuple[int, ...], float]]:
    """``{latent or (ids): value}`` or ``[(ids, value)]`` as the CLI's (ids, value) pairs."""
    if value is None:
        return []
    pairs = value.items() if isinstance(value, dict) else value
    return [((ids,) if isinstance(ids, int) else tuple(ids), float(v)) for ids, v in pairs]


def intervene(
    workspace: PathLike,
    run: str,
    prompt: str,
    *,
    ablate: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
    clamp: dict[Any, float] | Sequence[tuple[Any, float]] | None = None,
    scale: dict[Any, float] | Sequence[tuple[Any, float]] | None = None,
    steer: dict[Any, float] | Sequence[tuple[Any, float]] | None = None,
    error_term: bool = True,
    candidates: Sequence[str] = (),
    hook: str | None = None,
    top_k: int = 10,
    generate: int = 0,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    model: Any = None,
    model_name: str | None = None,
) -> InterventionResult:
    """Edit SAE latents on a prompt and compare with the clean model (`saewb intervene`).

    ``ablate``: latent ids to zero; ``clamp`` / ``scale``: ``{latent: value}`` (a tuple of ids as a
    key edits them together); ``steer``: ``{latent: coeff}`` adds coeff·W_dec[latent] at the hook.
    Causal LMs: top-``top_k`` next tokens, logit differences and ``generate`` tokens (greedy, or
    ``sample`` with ``temperature`` and ``seed``). Encoders: similarity to the ``candidates``.
    ``model``: a TransformerBridge already loaded (else the harvest's model, or ``model_name``).
    """
    from analysis.interventions import intervene_run

    with _checked():
        out = intervene_run(
            workspace,
            run,
            prompt,
            ablate=_groups(ablate),
            clamp=_valued(clamp),
            scale=_valued(scale),
            steer=_valued(steer),
            error_term=error_term,
            model=model,
            model_name=model_name,
            hook=hook,
            top_k=top_k,
            max_new_tokens=generate,
            do_sample=sample,
            temperature=temperature,
            seed=seed,
            candidates=candidates,
        )
    return InterventionResult(run, out)
