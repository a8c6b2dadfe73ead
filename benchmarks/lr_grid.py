"""Learning-rate grid for the default rule (issue 21): best peak lr per (cache, n, budget) cell.

Each cell trains one architecture (default TopK, k 32, the trainer's default batch for the budget unless
``--batch`` is given, every other setting at its
default) at peak learning rates on a factor-2 ladder, starting from ``--start`` (a guess) and
walking towards the better side until the best is bracketed by a worse value on each side; then
it trains once with the trainer's default lr (``--lr`` left unset), so the table shows the
default's gap to the cell's best. Held-out FVU (μ = held-out mean), L0 and the dead fraction
(held-out: never fires on the eval split; train: the trainer's window count) come from
``benchmarks/quality.py``'s helpers, over the same exported train/eval splits and one seeded
token order per budget.

Every finished run is appended to ``--out`` (JSON lines) and skipped on a restart, so the grid is
resumable. ``--table`` prints the table from the file without training.

Run (pinned to one core, low priority, in the background):
    taskset -c 1 nice -n 5 python benchmarks/lr_grid.py \\
        --cache minilm=/tmp/ws.duckdb:blocks.3.hook_out --n 2048 8192 --budget 250000 1000000 \\
        --out /tmp/lr_grid.jsonl > /tmp/lr_grid.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from quality import export_split, token_order, train_ours  # noqa: E402

LADDER = 2.0
"""Ratio between neighbouring learning rates of a cell."""
MAX_RUNS = 5
"""Learning rates tried per cell at most (besides the default)."""


def key_of(row: dict[str, Any]) -> str:
    cell = [row[f] for f in ("cache", "arch", "n", "budget", "batch", "k", "lr", "extra")]
    return json.dumps(cell + ([row["patch"]] if row.get("patch") else []))


def apply_patches(patches: list[str]) -> dict[str, float]:
    """Set module constants (``sae.topk.RESAMPLE_ENC_GAIN=1.0``) for trying a value without a config field."""
    import importlib

    out: dict[str, float] = {}
    for spec in patches:
        target, value = spec.split("=", 1)
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise SystemExit(f"--patch {spec}: {module} has no {name}")
        setattr(mod, name, type(getattr(mod, name))(float(value)))
        out[target] = float(value)
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def train_fields() -> set[str]:
    from sae.configs import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def make_cfg(arch: str, n: int, k: int, extra: dict[str, Any]) -> Any:
    from sae.configs import ARCH_CONFIGS

    cls = ARCH_CONFIGS[arch]
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {"n_latents": n, **{k: v for k, v in extra.items() if k not in train_fields()}}
    if "k" in fields:
        kw["k"] = k
    return cls(**kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", action="append", default=[], help="name=workspace.duckdb:hook (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/lr_grid_cache"))
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--budget", type=int, nargs="+", default=[250_000, 1_000_000])
    p.add_argument("--skip-cell", nargs="*", default=[], help="n:budget pairs to skip, e.g. 32768:1000000")
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--batch", type=int, default=None, help="default: the trainer's default batch for the budget"
    )
    p.add_argument("--arch", default="topk")
    p.add_argument("--extra", default="{}", help="JSON: more arch (or TrainConfig) config fields")
    p.add_argument("--start", type=float, default=None, help="first lr of a cell (default: the default lr)")
    p.add_argument("--lrs", type=float, nargs="*", default=None, help="fixed lrs instead of the ladder walk")
    p.add_argument("--no-default", action="store_true", help="do not train the default-lr run")
    p.add_argument("--only-default", action="store_true", help="train only the default-lr run of each cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dead-over-train",
        action="store_true",
        help="also count latents the final SAE never fires on over the whole train split (dead_train_split)",
    )
    p.add_argument(
        "--patch", nargs="*", default=[], help="module.CONST=value, e.g. sae.topk.RESAMPLE_ENC_GAIN=1"
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/lr_grid.jsonl"))
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    a = p.parse_args()

    if a.table:
        print_table(load_rows(a.out))
        return

    extra = json.loads(a.extra)
    a.patched = apply_patches(a.patch)
    done = {key_of(r): r for r in load_rows(a.out)}
    skip = {tuple(int(v) for v in s.split(":")) for s in a.skip_cell}

    for spec in a.cache:
        name, rest = spec.split("=", 1)
        ws, hook = rest.rsplit(":", 1)
        cdir = a.cache_dir / name
        cdir.mkdir(parents=True, exist_ok=True)
        train = export_split(Path(ws), hook, "train", cdir / "train.npy")
        ev = np.asarray(export_split(Path(ws), hook, "eval", cdir / "eval.npy"), np.float32)
        d = int(train.shape[1])
        print(f"{name}: d={d}, train {len(train):,}, eval {len(ev):,}", file=sys.stderr, flush=True)
        for budget in a.budget:
            from sae.configs import default_batch_size

            batch = a.batch or default_batch_size(budget)
            steps = budget // batch
            order = token_order(len(train), steps * batch, a.seed)
            for n in a.n:
                if (n, budget) in skip:
                    continue

                run = functools.partial(
                    run_one, a, done, Data(name, train, ev, order, d, steps, batch), n, budget, extra
                )
                if a.only_default:
                    pass
                elif a.lrs:
                    for lr in a.lrs:
                        run(lr)
                else:
                    walk(run, a.start or guess_lr(n, steps), MAX_RUNS)
                if not a.no_default:
                    run(None)
    print_table(load_rows(a.out))


@dataclasses.dataclass
class Data:
    """One cache at one budget: the exported splits and the shared token order."""

    name: str
    train: np.ndarray
    ev: np.ndarray
    order: np.ndarray
    d: int
    steps: int
    batch: int


def run_one(
    a: argparse.Namespace,
    done: dict[str, dict[str, Any]],
    data: Data,
    n: int,
    budget: int,
    extra: dict[str, Any],
    lr: float | None,
) -> dict[str, Any]:
    """Train one grid point (``lr`` None: the trainer's default), append it to ``a.out``, return it."""
    from sae.trainer import TrainConfig

    cfg = make_cfg(a.arch, n, a.k, extra)
    row: dict[str, Any] = {
        "cache": data.name,
        "arch": a.arch,
        "n": n,
        "budget": budget,
        "batch": data.batch,
        "k": a.k,
        "lr": lr,
        "extra": extra,
    }
    if a.patched:
        row["patch"] = a.patched
    if lr is None:  # the default is whatever the trainer's rule says today
        tc = TrainConfig(train_tokens=data.steps * data.batch, batch_size=data.batch)
        row["default_lr"] = default_lr_of(tc, cfg, data.d)
        row["lr"] = f"default={row['default_lr']:.4g}"
    kk = key_of(row)
    if kk in done:
        return done[kk]
    t0 = time.perf_counter()
    train_kw = {k: v for k, v in extra.items() if k in train_fields()}
    res = train_ours(
        cfg,
        data.train,
        data.order,
        data.ev,
        data.batch,
        a.seed,
        lr,
        dead_over_train=a.dead_over_train,
        **train_kw,
    )
    row.update(res, d=data.d, steps=data.steps, wall_s=time.perf_counter() - t0)
    done[kk] = row
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    print(json.dumps(shown), file=sys.stderr, flush=True)
    return row


def default_lr_of(tc: Any, cfg: Any, d: int) -> float:
    """The trainer's default peak lr for this run."""
    return float(tc.peak_lr(cfg.n_latents))


def guess_lr(n: int, steps: int) -> float:
    """Where a cell's walk starts: ~1e-2 at n 4096 and 244 steps (the issue's MiniLM measurement)."""
    return 1e-2 * math.sqrt(4096 / n) * (244 / max(steps, 1)) ** 0.25


def fvu_of(row: dict[str, Any]) -> float:
    v = row.get("fvu", math.nan)
    return v if math.isfinite(v) else math.inf


def walk(run: Any, start: float, max_runs: int) -> None:
    """Factor-2 ladder from ``start`` until the best lr has a worse neighbour on both sides."""
    tried: dict[float, float] = {}

    def at(lr: float) -> float:
        lr = float(f"{lr:.4g}")
        if lr not in tried:
            try:
                tried[lr] = fvu_of(run(lr))
            except Exception as e:  # a diverged run is a (very bad) grid point
                print(f"lr {lr:g}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                tried[lr] = math.inf
        return tried[lr]

    at(start)
    at(start * LADDER)
    at(start / LADDER)
    while len(tried) < max_runs:
        best = min(tried, key=lambda lr: tried[lr])
        lo, hi = min(tried), max(tried)
        if best == hi:
            at(hi * LADDER)
        elif best == lo:
            at(lo / LADDER)
        else:
            break


def current_default(arch: str, n: int, budget: int, batch: int, extra: dict[str, Any]) -> float:
    """The default peak lr the trainer would use for this cell today."""
    from sae.configs import TrainConfig

    tc_kw = {k: v for k, v in extra.items() if k in train_fields()}
    return TrainConfig(train_tokens=(budget // batch) * batch, batch_size=batch, **tc_kw).peak_lr(n)


def print_table(rows: list[dict[str, Any]]) -> None:
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        name = json.dumps({**r["extra"], **r.get("patch", {})})
        cells.setdefault((r["cache"], r["arch"], name, r["n"], r["budget"], r["batch"], r["k"]), []).append(r)
    print(
        "| cache | arch | n | budget | batch | steps | lrs tried (FVU) | best lr | best FVU | dead (held-out / train) "
        "at best | default lr | default FVU | gap | default dead (held-out / train) |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (cache, arch, extra, n, budget, _batch, _k), rs in sorted(cells.items()):
        rs = [r for r in rs if "fvu" in r]
        grid = sorted((r for r in rs if isinstance(r["lr"], float)), key=lambda r: r["lr"])
        defaults = [r for r in rs if not isinstance(r["lr"], float)]
        name = arch + ("" if extra == "{}" else f" {extra}")
        tried = ", ".join(f"{r['lr']:.3g} ({r['fvu']:.4f})" for r in grid)
        best = min(grid, key=fvu_of) if grid else None
        steps = rs[0].get("steps", "")
        line = f"| {cache} | {name} | {n} | {budget:,} | {_batch} | {steps} | {tried} | "
        line += (
            f"{best['lr']:.3g} | {best['fvu']:.4f} | {best['dead_eval']:.3f} / {best['dead_train']:.3f} | "
            if best
            else "– | – | – | "
        )
        today = current_default(arch, n, budget, _batch, rs[0]["extra"])
        same = [r for r in grid if abs(r["lr"] / today - 1) < 0.01]
        if same:  # the rule picks a grid point: that run is the default run
            defaults.append({**same[0], "default_lr": today})
        if defaults:
            dft = defaults[-1]
            gap = dft["fvu"] - best["fvu"] if best else math.nan
            line += (
                f"{dft['default_lr']:.3g} | {dft['fvu']:.4f} | {gap:+.4f} | "
                f"{dft['dead_eval']:.3f} / {dft['dead_train']:.3f} |"
            )
        else:
            line += "– | – | – | – |"
        print(line)


if __name__ == "__main__":
    main()
