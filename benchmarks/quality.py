"""Held-out quality of our TopK SAE against SAELens on the MiniLM activation cache (issue 3, proof 2).

Data: one hook of the bundled all-MiniLM-L6-v2 (default ``blocks.3.hook_out``) harvested from the
built-in ``stdlib-docs`` corpus into a workspace (harvested here with ``saewb harvest`` when the
workspace lacks it). The train and eval splits of ``activations.stream.ActivationStream`` (eval =
documents hashed into the 5% eval bucket, special tokens excluded) are exported once to .npy, and
one token order (a seeded permutation per epoch, repeated until the token budget is spent) is
shared: our trainer and SAELens see the same batches in the same order.

Seed policy: ``--seed`` seeds the shared data order and each library's own parameter init.
Token budget: ``--train-tokens`` for every run (whole batches). Each library keeps its own defaults
otherwise (ours: Adam, the default lr rule of ``sae.configs.default_lr`` with warmup and final decay, unit-norm decoder, input
scaling, AuxK; SAELens: Adam lr 3e-4 constant, ``TopKTrainingSAE`` defaults), except that the
SAELens dead-latent window, which it counts in steps, is set to our window in tokens so AuxK starts
at the same point for both.

Metrics, all on the held-out split: FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² (μ = held-out mean), L0 = mean
number of non-zero latents per token, dead = fraction of latents that never fire on it.
Also trained: our ``relu_l1`` (λ from ``--l1-coefs``) and ``gba`` (target frequencies chosen so the
expected L0 is ``--l0-target``), for the L0-vs-FVU table.

Setup (once):  bash benchmarks/peers_setup.sh
Run:           .venv/bin/python benchmarks/quality.py              # ~1M tokens per run; tens of minutes on 2 cores
               .venv/bin/python benchmarks/quality.py --quick      # ~1 minute smoke run (tiny budget, n=1024)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = ROOT / ".bench-venvs"
sys.path.insert(0, str(ROOT))  # `sae`, `activations` live at the repo root

PREFIX = "@@"


def ensure_harvest(ws: Path, hook: str, max_tokens: int, ctx_len: int) -> None:
    """Harvest MiniLM activations from stdlib-docs into ``ws`` unless the hook is already there."""
    if ws.exists():
        from activations.store import harvest_info
        from saewb.workspace import Workspace

        try:
            if hook in harvest_info(Workspace(ws), None).hooks:
                return
        except Exception as e:  # an unreadable or foreign workspace: say so rather than overwrite it
            raise SystemExit(f"workspace {ws} has no usable harvest ({e}); pass another --workspace") from e
    saewb = Path(sys.executable).parent / "saewb"
    cmd = [
        str(saewb),
        "harvest",
        "--model",
        "minilm",
        "--corpus",
        "stdlib-docs",
        "--hook",
        hook,
        "--ctx-len",
        str(ctx_len),
        "--max-tokens",
        str(max_tokens),
        "--workspace",
        str(ws),
        "--quiet",
    ]
    print("harvesting:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def export_split(ws: Path, hook: str, split: str, out: Path) -> np.ndarray:
    from activations.stream import ActivationStream

    if out.exists():
        return np.load(out, mmap_mode="r")
    stream = ActivationStream(ws, hook, batch_size=65536, seed=0, split=split)  # type: ignore[arg-type]
    arr = np.concatenate(list(stream.epoch())).astype(np.float32)
    np.save(out, arr)
    return arr


def token_order(n: int, total: int, seed: int) -> np.ndarray:
    """A fresh seeded permutation per epoch, concatenated to ``total`` indices."""
    parts, have, epoch = [], 0, 0
    while have < total:
        parts.append(np.random.default_rng([seed, epoch]).permutation(n))
        have += n
        epoch += 1
    return np.concatenate(parts)[:total].astype(np.int64)


def fvu_l0_dead(
    encode: Any, decode: Any, ev: np.ndarray, chunk: int = 4096, cutoff: float | None = None
) -> dict[str, float]:
    """Held-out FVU (μ = held-out mean), L0 and never-fired fraction; sums in float64. Tokens above
    ``cutoff`` (the SAE's outlier cutoff) are left out, as `saewb eval` leaves them out."""
    from sae.common import typical_rows

    keep = typical_rows(np.asarray(ev), cutoff)
    err = 0.0
    l0 = 0.0
    fired: np.ndarray | None = None
    for s in range(0, len(ev), chunk):
        x = np.asarray(ev[s : s + chunk], np.float32)[keep[s : s + chunk]]
        if not len(x):
            continue
        f = np.asarray(encode(x))
        x_hat = np.asarray(decode(f))
        err += float(np.sum((x.astype(np.float64) - x_hat.astype(np.float64)) ** 2))
        nz = f != 0
        l0 += float(nz.sum())
        fired = nz.any(0) if fired is None else fired | nz.any(0)
    evd = np.asarray(ev, np.float64)[keep]
    var = float(np.sum((evd - evd.mean(0)) ** 2))
    assert fired is not None
    out = {"fvu": err / var, "l0": l0 / len(evd), "dead_eval": float(np.mean(~fired))}
    return {**out, "outlier_tokens": float((~keep).sum())} if cutoff is not None else out


def never_fired(encode: Any, chunks: Iterable[np.ndarray], cutoff: float | None = None) -> float:
    """``sae.metrics.never_fired`` over ``chunks`` with the rows above ``cutoff`` left out, as the SAE's
    own evaluation leaves them out."""
    from sae.common import typical_rows
    from sae.metrics import never_fired as never_fired_rows

    rows = (part[typical_rows(part, cutoff)] for part in (np.asarray(c, np.float32) for c in chunks))
    return never_fired_rows(encode, rows)[0]


def row_chunks(x: np.ndarray, chunk: int = 4096) -> Iterator[np.ndarray]:
    for s in range(0, len(x), chunk):
        yield x[s : s + chunk]


def ordered_batches(
    train: np.ndarray, order: np.ndarray, batch: int
) -> Callable[[int], Iterator[np.ndarray]]:
    """The trainer's data source over a fixed token order: deterministic in `start`, as resume requires."""
    steps = len(order) // batch

    def batches(start: int) -> Iterator[np.ndarray]:
        for s in range(start, steps):
            yield np.ascontiguousarray(train[order[s * batch : (s + 1) * batch]])

    return batches


def train_ours(
    cfg: Any,
    train: np.ndarray,
    order: np.ndarray,
    ev: np.ndarray,
    batch: int,
    seed: int,
    lr: float | None = None,
    save: Path | None = None,
    dead_over_train: bool = False,
    **train_kw: Any,
) -> dict[str, Any]:
    import jax

    from sae.base import arch_module
    from sae.trainer import TrainConfig, dead_window
    from sae.trainer import train as sae_train

    steps = len(order) // batch
    tc = TrainConfig(
        train_tokens=steps * batch,
        batch_size=batch,
        seed=seed,
        lr=lr,
        log_every=max(1, steps // 10),
        **train_kw,
    )

    t0 = time.perf_counter()
    # Same order as the SAELens worker.
    res = sae_train(cfg, tc, ordered_batches(train, order, batch), progress=False)
    secs = time.perf_counter() - t0
    arch = arch_module(cfg.arch)
    enc = jax.jit(lambda x: arch.encode(cfg, res.params, res.arch_state, x))
    dec = jax.jit(lambda f: arch.decode(cfg, res.params, f))
    out = fvu_l0_dead(enc, dec, ev, cutoff=res.outlier_cutoff)
    if dead_over_train:  # the final SAE over every training token
        out["dead_train_split"] = never_fired(enc, row_chunks(train), cutoff=res.outlier_cutoff)
    if save is not None:  # the SAELens form, so `saewb eval` can splice it like the peer's
        from sae.api import SAE
        from sae.interop import export_saelens

        export_saelens(SAE(cfg, res.params, res.arch_state, ev.shape[1]), save)
        out["saved"] = str(save)
    out.update(
        seconds=secs,
        tokens=steps * batch,
        dead_train=res.final_metrics.get("dead_frac", float("nan")),
        dead_window=dead_window(tc),
        history=[{k: r[k] for k in ("step", "fvu", "l0", "dead_frac") if k in r} for r in res.history],
    )
    return out


def run_saelens(
    paths: dict[str, Path],
    n: int,
    k: int,
    batch: int,
    seed: int,
    dead_window: int,
    lr: float,
    normalize: bool,
    save: Path | None = None,
) -> dict[str, Any]:
    python = VENVS / "saelens" / "bin" / "python"
    if not python.exists():
        return {"error": f"venv missing ({python.parent.parent}); run benchmarks/peers_setup.sh"}
    cmd = [
        str(python),
        str(HERE / "_peer_saelens.py"),
        "quality",
        "--train",
        str(paths["train"]),
        "--eval",
        str(paths["eval"]),
        "--order",
        str(paths["order"]),
        "--n",
        str(n),
        "--k",
        str(k),
        "--batch",
        str(batch),
        "--seed",
        str(seed),
        "--dead-window-tokens",
        str(dead_window),
        "--lr",
        str(lr),
    ]
    if normalize:
        cmd.append("--normalize")
    if save is not None:
        cmd += ["--save", str(save)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PREFIX):
            out = json.loads(line[len(PREFIX) :])
            return {**out, "saved": str(save)} if save is not None else out
    return {"error": f"rc={proc.returncode}: {proc.stderr.strip()[-400:]}"}


def downstream_table(ws: Path, hook: str, rows: list[dict[str, Any]], windows: int) -> None:
    """Import each saved SAE as a run and score all of them on the same held-out windows (paired ΔCE)."""
    from analysis.evaluate import evaluate_runs
    from sae import runs
    from sae.interop import import_saelens
    from saewb.workspace import Workspace

    names = []
    for r in rows:
        name = Path(r["saved"]).name
        if runs.get_run(Workspace(ws), name) is None:
            import_saelens(r["saved"], ws, name, hook=hook)
        names.append(name)
    outs = evaluate_runs(ws, names, max_seqs=windows, batch_size=8, progress=True)
    print(
        f"\n### With each SAE spliced in: {int(outs[0]['lm_targets']):,} held-out next-token targets, the same for all\n"
    )
    print(f"| SAE | setting | CE score | ΔCE (nats) | KL score | ΔCE − {names[0]} [95%] |")
    print("|---|---|---:|---:|---:|---:|")
    for r, o in zip(rows, outs, strict=True):
        paired = (
            f"{o['delta_ce_diff']:+.4f} ± {o['delta_ce_diff_ci95']:.4f}"
            if "delta_ce_diff" in o
            else "reference"
        )
        print(
            f"| {r['name']} | {r['setting']} | {o['ce_score']:.4f} | {o['delta_ce']:.4f} | {o['kl_score']:.4f} | {paired} |"
        )
        r.update(
            {
                k: o[k]
                for k in ("ce_score", "delta_ce", "kl_score", "ce_clean", "ce_sae", "ce_zero", "lm_targets")
            }
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: n=512, batch 512, ~30k tokens per run")
    p.add_argument(
        "--workspace", type=Path, default=Path(tempfile.gettempdir()) / "saewb_bench_minilm.duckdb"
    )
    p.add_argument("--hook", default="blocks.3.hook_out")
    p.add_argument("--harvest-tokens", type=int, default=1_000_000, help="max tokens to harvest if needed")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--train-tokens", type=int, default=None, help="per run (default 1,000,000; 30,720 quick)")
    p.add_argument("--n", type=int, default=None, help="latents (default 4096; 512 quick)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="tokens per step (default 4096; 512 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--saelens-lr",
        type=float,
        nargs="+",
        default=[3e-4],
        help="SAELens learning rate(s); 3e-4 is its default. Several give several rows.",
    )
    p.add_argument(
        "--ours-lr",
        type=lambda v: None if v == "default" else float(v),
        nargs="+",
        default=[None],
        help="our TopK peak learning rate(s), 'default' for the trainer's rule (sae.configs.default_lr, "
        "the default)",
    )
    p.add_argument(
        "--saelens-normalize",
        action="store_true",
        help="SAELens normalize_activations=expected_average_only_in (default: none, its default)",
    )
    p.add_argument("--l1-coefs", type=float, nargs="*", default=None, help="relu_l1 λ values (default 5)")
    p.add_argument("--l0-target", type=float, default=None, help="GBA expected L0 (default k)")
    p.add_argument(
        "--gba-update-tokens",
        type=int,
        default=None,
        help="GBA tokens between bias updates (default: its default)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["saelens", "topk", "relu_l1", "gba"])
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where the .npy exports go (default: next to ws)"
    )
    p.add_argument(
        "--ce-windows",
        type=int,
        default=0,
        help="also splice every TopK SAE into the harvest's model over this many held-out windows: CE "
        "score and ΔCE on the same tokens for all, each against the first (`saewb eval A B ...`); the SAEs "
        "are imported into the workspace as runs named RUN_PREFIX-<library>-<lr>",
    )
    p.add_argument("--run-prefix", default="quality", help="name prefix of the runs --ce-windows imports")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    n = a.n or (512 if a.quick else 4096)
    batch = a.batch or (512 if a.quick else 4096)
    budget = a.train_tokens or (30_720 if a.quick else 1_000_000)
    l1_coefs = a.l1_coefs if a.l1_coefs is not None else [5.0]
    l0_target = a.l0_target or float(a.k)
    if a.quick and a.harvest_tokens == p.get_default("harvest_tokens"):
        a.harvest_tokens = 100_000

    ensure_harvest(a.workspace, a.hook, a.harvest_tokens, a.ctx_len)
    cache = a.cache_dir or a.workspace.parent / f"{a.workspace.stem}.{a.hook}.export"
    cache.mkdir(parents=True, exist_ok=True)
    train = export_split(a.workspace, a.hook, "train", cache / "train.npy")
    ev = np.asarray(export_split(a.workspace, a.hook, "eval", cache / "eval.npy"), np.float32)
    steps = budget // batch
    order = token_order(len(train), steps * batch, a.seed)
    paths = {
        "train": cache / "train.npy",
        "eval": cache / "eval.npy",
        "order": cache / f"order_{a.seed}_{steps * batch}.npy",
    }
    np.save(paths["order"], order)
    d = train.shape[1]
    epochs = steps * batch / len(train)
    print(
        f"data: {a.hook}, d={d}, train {len(train):,} tokens, held-out {len(ev):,} tokens; "
        f"budget {steps * batch:,} tokens = {steps} steps of {batch} ({epochs:.2f} epochs)",
        file=sys.stderr,
    )

    from sae.gba import GBAConfig
    from sae.relu_l1 import ReluL1Config
    from sae.topk import TopKConfig
    from sae.trainer import TrainConfig, dead_window

    window = dead_window(TrainConfig(train_tokens=steps * batch, batch_size=batch))
    rows: list[dict[str, Any]] = []

    def record(name: str, setting: str, res: dict[str, Any]) -> None:
        res = {"name": name, "setting": setting, **res}
        rows.append(res)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
        print(json.dumps(shown), file=sys.stderr, flush=True)

    saved = cache / f"saes_{a.seed}_{steps * batch}_{n}"

    def save_to(lib: str, lr: float | None) -> Path | None:
        if not a.ce_windows:
            return None
        # run names take letters, digits, '_' and '-': lr 1e-3 -> "1e-3", 2.5e-4 -> "2p5e-4"
        shown = (
            "default"
            if lr is None
            else f"{lr:.1e}".replace(".0e", "e").replace(".", "p").replace("e-0", "e-")
        )
        return saved / f"{a.run_prefix}-{lib}-{shown}"

    if "topk" not in a.skip:
        for lr in a.ours_lr:
            default = TrainConfig(train_tokens=steps * batch, batch_size=batch).peak_lr(n)
            shown = f"lr={lr:g}" if lr is not None else f"lr={default:g} (default)"
            record(
                "ours TopK",
                f"k={a.k}, {shown}",
                train_ours(
                    TopKConfig(n_latents=n, k=a.k),
                    train,
                    order,
                    ev,
                    batch,
                    a.seed,
                    lr,
                    save=save_to("ours", lr),
                ),
            )
    if "saelens" not in a.skip:
        for lr in a.saelens_lr:
            record(
                "SAELens TopK",
                f"k={a.k}, lr={lr:g}"
                + (" (default)" if lr == 3e-4 else "")
                + (", normalized" if a.saelens_normalize else ""),
                run_saelens(
                    paths, n, a.k, batch, a.seed, window, lr, a.saelens_normalize, save=save_to("saelens", lr)
                ),
            )
    if "relu_l1" not in a.skip:
        for lam in l1_coefs:
            record(
                "ours relu_l1",
                f"λ={lam:g}",
                train_ours(ReluL1Config(n_latents=n, l1_coef=lam), train, order, ev, batch, a.seed),
            )
    if "gba" not in a.skip:
        cfg = GBAConfig(n_latents=n, target_l0=l0_target)
        if a.gba_update_tokens:
            cfg = dataclasses.replace(cfg, update_tokens=a.gba_update_tokens)
        record(
            "ours gba",
            f"K={cfg.n_groups}, htf={cfg.resolved_htf():.4f}, ltf={cfg.ltf:g}, T={cfg.update_tokens} tokens",
            train_ours(cfg, train, order, ev, batch, a.seed),
        )

    print(
        f"\n### Held-out quality: {a.workspace.name} {a.hook}; n={n}, batch={batch}, "
        f"{steps * batch:,} training tokens ({epochs:.2f} epochs of {len(train):,}), "
        f"held-out {len(ev):,} tokens, seed {a.seed}\n"
    )
    print(
        f"Dead = never fires on the held-out set; dead (train) = no firing in the last {window:,} training "
        "tokens (the AuxK window, the same for both TopK trainers).\n"
    )
    print("| SAE | setting | held-out FVU | L0 | dead (held-out) | dead (train) | train s | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r.get("l0", float("inf"))):
        if "error" in r:
            print(f"| {r['name']} | {r['setting']} | – | – | – | – | – | {r['error']} |")
            continue
        print(
            f"| {r['name']} | {r['setting']} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_eval']:.3f} | "
            f"{r['dead_train']:.3f} | {r['seconds']:.0f} | {r['tokens'] / r['seconds']:,.0f} |"
        )
    ours_rows = [r for r in rows if r["name"] == "ours TopK" and "error" not in r]
    ours = min(ours_rows, key=lambda r: r["fvu"]) if ours_rows else None
    peers = [r for r in rows if r["name"] == "SAELens TopK" and "error" not in r]
    print("\n| goal | measured | status |")
    print("|---|---:|---|")
    if ours is None or not peers:
        print("| our FVU ≤ SAELens FVU + 0.005 | – | not measured |")
    else:
        best = min(peers, key=lambda r: r["fvu"])
        gap = ours["fvu"] - best["fvu"]
        print(
            f"| our FVU ≤ SAELens FVU + 0.005 (best rows: ours {ours['setting']}; SAELens {best['setting']}) | "
            f"{ours['fvu']:.4f} vs {best['fvu']:.4f} (Δ = {gap:+.4f}) | {'met' if gap <= 0.005 else 'MISSED'} |"
        )
    if a.ce_windows:
        downstream_table(a.workspace, a.hook, [r for r in rows if r.get("saved")], a.ce_windows)
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
