"""One run lifecycle: load-or-initialise, checkpoint, finalise.

Every way of training an SAE goes through these functions: the single-run trainer
(``sae.trainer.train``), the lockstep sweep (``sae.sweep.train_lockstep``) and an architecture's own
fit (``sae.itda.fit``); ``sae.load`` reads checkpoints with ``read_train_state``.

- Identity: a run's identity is ``config_record`` (architecture config + train config, minus where it
  executes). ``refuse_different_config`` is the one "different config under this name" refusal; after
  the divergence guard stopped a run (``DIVERGED_FILE`` in its directory, or ``runs.reason``) only
  its ``lr`` may change.
- Resume: ``resume_manifest`` finds a run directory's newest checkpoint and checks its identity;
  ``read_train_state`` reads it into a trainer's state.
- Checkpoint: ``checkpoint_meta`` + ``write_checkpoint`` (which also clears ``DIVERGED_FILE``: the
  checkpoint now holds the config the run goes on with).
- Finalise: ``finish_training`` folds the input scale and saves the SAE (``save_final``);
  ``finalise_run`` evaluates it on held-out tokens (``end_of_run_metrics``, through the one held-out
  evaluation ``heldout_metrics`` that `saewb eval` uses too) and writes its run row:
  done, or failed with the reason when its final FVU is not finite.
- Divergence: ``stop_diverged`` records why the guard stopped a run and builds ``RunDivergedError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae import checkpoint as ckpt
from sae import runs

EXECUTION_FIELDS = ("mesh_data", "mesh_model")
"""TrainConfig fields that change where a run executes, not what it computes: left out of the
run's identity, so a run may resume on another mesh."""
DIVERGED_FILE = "DIVERGED.json"
"""Written in a run directory when the guard stops the run; lets a resume change lr."""
RESUME_FIX = "pick another --name, or repeat its original config to resume it"


class RunDivergedError(RuntimeError):
    """The divergence guard stopped a run; its message says why and how to go on."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """What the runs table records (it begins with ``runs.DIVERGED``)."""


@dataclass
class TrainResult:
    params: Any
    """Inference-form params (input scale folded in: they take raw activations)."""
    arch_state: Any
    config: Any
    train_config: Any
    scale: float
    d: int
    final_metrics: dict[str, float]
    run_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    outlier_cutoff: float | None = None
    """Raw-activation norm above which tokens were left out of training (``TrainConfig.outlier_ratio``)."""


# ------------------------------------------------------------------------------------ identity


def config_record(cfg: Any, tc: Any) -> dict[str, Any]:
    """The JSON-able identity of a run (compared on resume).

    The mesh is left out (a layout, not a result); compute_dtype only when it is not the default,
    and an architecture field added later only when it is not at the value older runs trained with
    (``sae.base.recorded_fields``), so runs recorded before they existed keep their identity.
    """
    from sae.base import recorded_fields

    train = {k: v for k, v in recorded_fields(tc).items() if k not in EXECUTION_FIELDS}
    if train.get("compute_dtype") == "float32":
        del train["compute_dtype"]
    return {"arch": cfg.arch, "sae": recorded_fields(cfg), "train": train}


def refuse_different_config(
    stored: dict[str, Any],
    new: dict[str, Any],
    diverged: bool,
    holder: str,
    *,
    fix: str = RESUME_FIX,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` unless a run stored with ``stored`` may go on with ``new`` (``runs.may_resume``).

    ``holder`` says where the other run is ("a run named 'x' already exists", "run directory d holds a run").
    """
    if not runs.may_resume(stored, json.loads(json.dumps(new)), diverged):
        raise error(
            f"{holder} with a different config; {fix}"
            + (" (after a divergence only --lr may change)" if diverged else "")
        )


def diverged_before(run_dir: Path | None) -> bool:
    """Whether the guard stopped this run (so a resume may change its lr)."""
    return run_dir is not None and (Path(run_dir) / DIVERGED_FILE).exists()


def stop_diverged(run_dir: Path | None, reason: str, what: str = "run") -> RunDivergedError:
    """Record the reason in ``run_dir`` and build the error that stops the run."""
    kept = None
    if run_dir is not None:
        latest = ckpt.latest_checkpoint(run_dir)
        kept = int(ckpt.read_manifest(latest)["step"]) if latest is not None else None
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / DIVERGED_FILE).write_text(json.dumps({"reason": reason, "checkpoint_step": kept}))
    how = (
        f"its last good checkpoint (step {kept}) is kept: run the same command with a lower --lr to go on from it"
        if kept is not None
        else "no checkpoint was written yet: run the same command with a lower --lr to start over"
    )
    return RunDivergedError(f"{what} stopped, {reason}; {how}", reason)


# -------------------------------------------------------------------------- load or initialise


def resume_manifest(run_dir: Path | None, record: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``run_dir`` and its manifest, or None to initialise a new run.

    Refuses a checkpoint of a different config. With several processes, all must see the same one.
    """
    import jax

    latest = ckpt.latest_checkpoint(run_dir) if run_dir is not None else None
    if jax.process_count() > 1:
        from sae import distributed

        distributed.check_same(
            int(latest.name.removeprefix("step_")) if latest is not None else -1,
            "the checkpoint to resume from (is run_dir on a filesystem every process shares?)",
        )
    if latest is None:
        return None
    manifest = ckpt.read_manifest(latest)
    refuse_different_config(
        manifest["config"], record, diverged_before(run_dir), f"run directory {run_dir} holds a run"
    )
    return latest, manifest


def read_train_state(trainer: Any, path: Path) -> Any:
    """The (unplaced) ``TrainState`` of ``trainer``'s run stored in checkpoint ``path``."""
    import numpy as np

    template = trainer.init_state(np.zeros((2, trainer.d), np.float32))
    trees, _ = ckpt.read_bundle(path, train_trees(template))
    return template.replace(params=trees["params"], opt_state=trees["opt_state"], **trees["state"])


def train_trees(ts: Any) -> dict[str, Any]:
    """What a checkpoint stores of a ``TrainState`` for an exact resume."""
    state = {
        "arch_state": ts.arch_state,
        "since_fired": ts.since_fired,
        "step": ts.step,
        "rng": ts.rng,
        "win": ts.win,
    }
    return {"params": ts.params, "opt_state": ts.opt_state, "state": state}


# ----------------------------------------------------------------------------------- checkpoint


def checkpoint_meta(
    record: dict[str, Any],
    d: int,
    scale: float,
    last_metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """A checkpoint's manifest fields: the run's identity, width, input scale, last metric row."""
    meta = {"config": record, "d": d, "scale": scale, **more, "last_metrics": last_metrics}
    return {**meta, "extra": extra} if extra else meta


def write_checkpoint(
    run_dir: Path,
    step: int,
    trees: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> Path:
    """Write one checkpoint (atomically, keeping the ``keep`` newest) and report it."""
    path = ckpt.save_checkpoint(run_dir, step, trees, meta, keep=keep)
    (Path(run_dir) / DIVERGED_FILE).unlink(missing_ok=True)  # the checkpoint now holds the new config
    if on_checkpoint is not None:
        on_checkpoint(path, step)
    return path


# ------------------------------------------------------------------------------------- finalise


def save_final(run_dir: Path, result: TrainResult, **more: Any) -> Path:
    """The saved SAE: inference-form params (raw activations) + arch state + JSON config."""
    meta = {
        "config": config_record(result.config, result.train_config),
        "d": result.d,
        "input_scale_folded": result.scale,
        "outlier_cutoff": result.outlier_cutoff,
        "final_metrics": result.final_metrics,
        **more,
    }
    return ckpt.write_bundle(
        Path(run_dir) / "sae", {"params": result.params, "state": result.arch_state}, meta
    )


def finish_training(
    cfg: Any,
    tc: Any,
    params: Any,
    state: Any,
    scale: float,
    d: int,
    history: list[dict[str, float]],
    last_row: dict[str, float],
    run_dir: Path | None,
    write: bool = True,
    outlier_cutoff: float | None = None,
    **more: Any,
) -> TrainResult:
    """Fold the input scale into the trained params, and save the SAE in ``run_dir`` when ``write``."""
    from sae.base import arch_module

    params, state = arch_module(cfg.arch).fold_scale(cfg, params, state, scale)
    final = dict(history[-1]) if history else dict(last_row)
    result = TrainResult(
        params=params,
        arch_state=state,
        config=cfg,
        train_config=tc,
        scale=scale,
        d=d,
        final_metrics=final,
        run_dir=run_dir,
        history=history,
        outlier_cutoff=outlier_cutoff,
    )
    if run_dir is not None and write:
        save_final(run_dir, result, **more)
    return result


def typical_batches(
    sae: Any,
    stream: Any,
    max_tokens: int | None = None,
    on_batch: Callable[[int], Any] | None = None,
    outliers: list[int] | None = None,
) -> Iterator[Any]:
    """The batches of ``stream`` (an ``ActivationStream``) up to ``max_tokens`` (all with None), less the
    tokens above the SAE's outlier cutoff, whose count is added to ``outliers[0]``; ``on_batch(tokens)``
    after each batch."""
    from sae.common import typical_rows

    seen = 0
    if max_tokens is not None and max_tokens <= 0:
        return
    for x in stream.epoch():
        part = x if max_tokens is None else x[: max_tokens - seen]
        keep = typical_rows(part, getattr(sae, "outlier_cutoff", None))
        if outliers is not None:
            outliers[0] += int((~keep).sum())
        yield part if keep.all() else part[keep]
        seen += len(part)
        if on_batch is not None:
            on_batch(len(part))
        if max_tokens is not None and seen >= max_tokens:
            return  # before the stream reads another buffer


def heldout_metrics(
    sae: Any, stream: Any, max_tokens: int | None = None, on_batch: Callable[[int], Any] | None = None
) -> dict[str, Any]:
    """The one held-out evaluation: a loaded SAE's reconstruction metrics (``sae.metrics.evaluate``)
    over the first ``max_tokens`` tokens (all with None) of ``stream``, an eval-split
    ``ActivationStream``; ``on_batch(tokens)`` after each batch. `saewb eval` calls it directly, the
    end of a training run through ``end_of_run_metrics``."""
    from sae.metrics import evaluate

    outliers = [0]
    metrics = evaluate(sae, typical_batches(sae, stream, max_tokens, on_batch, outliers))
    return {**metrics, "outlier_tokens": float(outliers[0])} if outliers[0] else metrics


def split_dead_fraction(
    sae: Any, stream: Any, on_batch: Callable[[int], Any] | None = None
) -> dict[str, float]:
    """``dead_train_split``: the fraction of latents that fire on no typical token of ``stream`` (the
    whole train split, as `saewb eval --dead-over-train` reads it), and ``train_split_tokens``."""
    from sae.metrics import never_fired

    frac, rows = never_fired(sae.encode, typical_batches(sae, stream, on_batch=on_batch))
    return {"dead_train_split": frac, "train_split_tokens": float(rows)}


def end_of_run_metrics(run_dir: Path, eval_stream: Callable[[], Any], eval_tokens: int) -> dict[str, Any]:
    """The saved SAE of ``run_dir`` evaluated (``heldout_metrics``) on ``eval_tokens`` held-out tokens,
    rounded down to whole batches of ``eval_stream()`` (at least one); ``eval_error`` when that cannot
    be done (an empty split). The end-of-run evaluation of `saewb train` and `saewb sweep`."""
    from sae.api import load_dir

    try:
        stream = eval_stream()
        n_batches = max(1, eval_tokens // stream.batch_size)
        return heldout_metrics(load_dir(run_dir), stream, n_batches * stream.batch_size)
    except ValueError as err:  # e.g. an empty eval split: keep the training metrics
        return {"eval_error": str(err)}


def check_final(ws: Any, name: str, final: dict[str, Any]) -> None:
    """Never mark a run done whose final FVU (held-out or training) is not finite: mark it failed."""
    bad = {k: v for k, v in final.items() if k in ("fvu", "train_fvu") and not math.isfinite(v)}
    if bad:
        err = RuntimeError(
            f"{runs.DIVERGED}: run {name!r} ended with a non-finite FVU ({bad}); it is marked failed, "
            "not done: run the same command with a lower --lr to go on from its last checkpoint"
        )
        runs.finish_run(ws, name, "failed", final, reason=str(err))
        raise err


def finalise_run(
    ws: Any, name: str, run_dir: Path, result: TrainResult, heldout: Callable[[], dict[str, Any]] | None
) -> dict[str, Any]:
    """A trained run's final metrics (training + held-out) in its run row, status done (or failed)."""
    final: dict[str, Any] = {f"train_{k}": v for k, v in result.final_metrics.items()}
    if heldout is not None:
        final.update(heldout())
    check_final(ws, name, final)
    runs.finish_run(ws, name, "done", final, str(Path(run_dir) / "sae"))
    return final
