"""One orchestrator: train runs in a workspace, for `saewb train` (``sae.cli``) and `saewb sweep` (``sae.sweep``).

Planning (before any work): ``load_yaml`` / ``normalise_keys`` read option files (keys with dashes
or underscores), ``open_sources`` checks the data sources (the first is the workspace that holds
the runs) and resolves their paths, ``fit_function`` picks how a single run trains (the trainer, or an architecture's own fit:
``sae.archs.OWN_FIT``) and ``check_lockstep`` refuses such an architecture in a sweep.

Running: ``train_runs`` registers the runs, logs their metric rows and checkpoints, records a
failure or an interruption, and finalises each run (``sae.lifecycle.finalise_run``: held-out
evaluation, run row and status).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def normalise_keys(values: Any, where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML mapping with its keys as option names (dashes become underscores); None is empty."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{where} must be a mapping of option: value, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def load_yaml(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The mapping of a YAML option file (``what``: "config file", "sweep file")."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from err
    return normalise_keys(data, f"{what} {path}", error)


def open_sources(value: Any, error: type[Exception] = ValueError) -> tuple[Any, list[str]]:
    """The workspace that holds the runs and every data source, paths resolved.

    ``value``: one workspace, or a list (shards of one harvest, Parquet exports) whose first item
    is a workspace .duckdb file.
    """
    from activations.store import as_sources, is_parquet_source
    from saewb.workspace import Workspace

    sources = as_sources(value)
    if is_parquet_source(sources[0]):
        raise error(
            f"the first --workspace ({sources[0]}) must be a workspace .duckdb file: it holds the run's records "
            "and checkpoints; put a workspace first and the Parquet exports after it"
        )
    ws = Workspace(sources[0])
    if not ws.exists():
        raise FileNotFoundError(
            f"workspace {ws.path} does not exist; create it with `saewb harvest --workspace {ws.path} ...`"
        )
    return ws, [str(s) if "://" in str(s) else str(Path(s).resolve()) for s in sources]


def check_lockstep(arch: str, who: str, error: type[Exception] = ValueError) -> None:
    """Refuse, before any work, a sweep member that cannot train in lockstep.

    A sweep advances every member by gradient steps; an architecture with its own fit
    (``sae.archs.OWN_FIT``) is trained alone, by `saewb train` (``fit_function``).
    """
    from sae.archs import OWN_FIT

    if arch in OWN_FIT:
        raise error(
            f"{who}: arch {arch!r} is not trained by gradient steps (it has its own fit), so it cannot train in "
            f"lockstep with a sweep; train it alone with `saewb train --arch {arch}`"
        )


def fit_function(arch: str) -> tuple[Callable[..., Any], bool]:
    """How a single run of ``arch`` trains: (``sae.trainer.train`` or the architecture's own ``fit``,
    whether its batches carry ``tok_idx``: an own fit labels what it keeps with them)."""
    from sae.archs import OWN_FIT
    from sae.base import arch_module

    if arch in OWN_FIT:
        return arch_module(arch).fit, True
    from sae.trainer import train

    return train, False


@dataclass(frozen=True)
class RunSpec:
    """One run to register and finalise in the workspace."""

    name: str
    hook: str
    arch: str
    record: dict[str, Any]
    """Its stored config (``runs.config``)."""
    run_dir: Path


def train_runs(
    ws: Any,
    harvest: str,
    specs: list[RunSpec],
    resume_step: int,
    fit: Callable[
        [Callable[[str, dict[str, float]], None], Callable[[str, Path, int], None]], dict[str, Any]
    ],
    heldout: Callable[[RunSpec], Callable[[], dict[str, Any]] | None],
    *,
    lead: bool = True,
    on_row: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Register ``specs`` as running, train them with ``fit(on_log, on_checkpoint)`` (which returns
    each run's ``TrainResult`` by name), then finalise each with its held-out evaluation.

    With several processes only the ``lead`` writes the workspace. A failure or an interruption is
    recorded on every run (the members the divergence guard stopped with their own reason, from the
    error's ``reasons``) and raised again.
    """
    from sae import runs
    from sae.lifecycle import finalise_run

    if lead:
        for s in specs:
            runs.start_run(
                ws,
                s.name,
                harvest=harvest,
                hook=s.hook,
                arch=s.arch,
                config=s.record,
                checkpoint_path=str(s.run_dir),
                resume_step=resume_step,
            )

    def on_log(name: str, row: dict[str, float]) -> None:
        runs.log_metrics(ws, name, [row])  # one short transaction per log row
        if on_row is not None:
            on_row(name, row)

    def on_checkpoint(name: str, path: Path, step: int) -> None:
        runs.set_checkpoint(ws, name, str(path))

    try:
        results = fit(on_log, on_checkpoint)
    except BaseException as err:
        if lead:
            reasons = getattr(err, "reasons", {})  # the members the divergence guard stopped
            others = (
                {s.name: f"stopped with the sweep: {' '.join(str(err).split())}" for s in specs}
                if reasons
                else {}
            )
            runs.mark_stopped(ws, [s.name for s in specs], err, {**others, **reasons})
        raise
    if not lead:
        return {s.name: {f"train_{k}": v for k, v in results[s.name].final_metrics.items()} for s in specs}
    return {s.name: finalise_run(ws, s.name, s.run_dir, results[s.name], heldout(s)) for s in specs}
