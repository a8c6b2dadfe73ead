"""Optional Weights & Biases logging for `saewb train --wandb` (off by default, never required).

The same metric rows the trainer writes to the workspace's `metrics` table go to a W&B run named
after the training run; its config is the run's stored config, and the final (held-out) metrics
become the W&B summary. The W&B run id is derived from the workspace and run name, so resuming a
training run continues the same W&B run. Offline: ``WANDB_MODE=offline`` (then `wandb sync`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

INSTALL_HINT = "--wandb needs the wandb package: `pip install wandb` (or `pip install -e '.[wandb]'`)"


def require_wandb() -> Any:
    """The wandb module, or a ValueError naming the install command."""
    try:
        import wandb
    except ImportError as err:
        raise ValueError(f"{INSTALL_HINT} ({err})") from err
    return wandb


def run_id(workspace: str | Path, name: str) -> str:
    """A stable W&B run id for (workspace, run): a resumed run logs into the same W&B run."""
    return hashlib.sha1(f"{Path(workspace).resolve()}::{name}".encode()).hexdigest()[:16]


class WandbLogger:
    """One W&B run mirroring one training run's metric rows."""

    def __init__(self, workspace: str | Path, name: str, project: str | None, config: dict[str, Any]) -> None:
        wandb = require_wandb()
        self.run = wandb.init(
            project=project or "saewb",
            name=name,
            id=run_id(workspace, name),
            resume="allow",
            config=config,
            reinit="finish_previous",
        )

    def log(self, row: dict[str, float]) -> None:
        self.run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=int(row["step"]))

    def finish(self, final: dict[str, Any] | None, ok: bool) -> None:
        if final:
            self.run.summary.update({k: v for k, v in final.items() if isinstance(v, int | float)})
        self.run.finish(exit_code=0 if ok else 1)
