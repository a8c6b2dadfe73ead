"""Loading a trained run to use it: its SAE, the harvest it was trained on, and its model.

Evaluation, probing, interventions, the analysis and the app all start here; none of them reads the
`runs` table or the harvest facts of a run any other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activations.store import HarvestInfo, harvest_info
from analysis.tables import AnalysisError
from saewb.workspace import Workspace


@dataclass
class RunContext:
    """A trained run with what is needed to splice it: its SAE, hook, harvest and model name."""

    ws: Workspace
    name: str
    sae: Any
    hook: str
    harvest: str
    model_name: str
    ctx_len: int
    sources: tuple[str, ...] = ()
    """Every data source of a run trained on a set; empty: the workspace alone."""


def find_run(ws: Workspace, run: str) -> dict[str, Any]:
    """The `runs` row of `run`; an error listing the workspace's runs when there is none."""
    from sae import runs

    row = runs.get_run(ws, run)
    if row is None:
        names = [r["name"] for r in runs.list_runs(ws)] if ws.table_exists("runs") else []
        raise AnalysisError(
            f"no run named {run!r} in {ws.path}; runs there: {', '.join(names) or 'none'} "
            f"(train one with `saewb train --workspace {ws.path} ...`)"
        )
    return row


def run_harvest(ws: Workspace, run: str) -> tuple[dict[str, Any], HarvestInfo]:
    """(runs row, harvest) of a run trained on a harvest of this workspace, its hook checked."""
    row = find_run(ws, run)
    if not row.get("harvest") or not row.get("hook"):
        raise AnalysisError(
            f"run {run!r} has no harvest/hook recorded (trained outside a workspace harvest); analysis reads the "
            "harvest's activations, so train the SAE on a harvest in this workspace"
        )
    info = harvest_info(ws, row["harvest"])
    if row["hook"] not in info.hooks:
        raise AnalysisError(
            f"hook {row['hook']!r} of run {run!r} is not in harvest {info.name!r} (it has {', '.join(info.hooks)})"
        )
    return row, info


def load_run(workspace: str | Path | Workspace, run: str) -> RunContext:
    """Load run `run` of a workspace and the harvest facts it was trained on."""
    import sae as sae_pkg

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    row = find_run(ws, run)
    if not row.get("hook"):
        raise AnalysisError(
            f"run {run!r} records no hook (trained on arrays, not a harvest); it cannot be spliced"
        )
    info = harvest_info(ws, row.get("harvest"))
    model = sae_pkg.load(run, workspace=ws.path)
    ident = info.config.get("identity", {})
    if info.hooks.get(row["hook"]) not in (None, model.d):
        raise AnalysisError(
            f"run {run!r} has width {model.d} but hook {row['hook']} of harvest {info.name!r} "
            f"has width {info.hooks[row['hook']]}"
        )
    sources = tuple((row.get("config") or {}).get("sources") or ())
    return RunContext(
        ws,
        run,
        model,
        row["hook"],
        info.name,
        str(ident.get("model", info.config.get("model"))),
        int(ident.get("ctx_len", 128)),
        sources,
    )


def load_run_model(ctx: RunContext, override: str | None = None) -> Any:
    """The TransformerBridge a run was harvested from (or `override`, a compatible model)."""
    from activations.models import load_model

    return load_model(override or ctx.model_name)
