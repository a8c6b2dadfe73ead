"""L0 vs held-out FVU for every registered gradient-trained SAE architecture (issue 6).

Data: the MiniLM ``blocks.3.hook_out`` cache of the demo workspace (``--workspace``, read only: the
train and eval splits of ``ActivationStream`` are exported once to .npy files in a temp dir; nothing
is written to the workspace). Every run sees the same token order (``benchmarks/quality.py``'s
seeded permutation per epoch) and the same token budget (``--train-tokens``), n = ``--n`` latents,
batch ``--batch``, the trainer's default learning rate, seed ``--seed``.

Sparsity per target L0 t (``--l0``, default 16/32/64):

* archs with a ``k`` field (topk, batchtopk, matryoshka, feature_choice, masked): k = t;
* hierarchical_topk: ONE model with K = max(t), evaluated at every k = t (``encode(x, k=t)``), next to
  TopK trained separately at each k (the paper claims within 0.01 FVU of them);
* jumprelu: ``target_l0 = t`` with ``l0_coef`` = ``--jumprelu-coef`` (the quadratic L0-target penalty);
* relu_l1: λ from ``--l1-coefs`` (one per target; rough values, the measured L0 is what the table shows);
* gba: target frequencies whose expected L0 (n · mean p_k) is t (``target_l0``).

Eval: the whole held-out split (documents hashed into the 5% eval bucket, special tokens excluded),
with each saved SAE's inference form (BatchTopK/Matryoshka: the tracked threshold θ, so its L0 is
not forced to k). FVU = Σ‖x − x̂‖²/Σ‖x − μ‖², L0 = mean non-zeros per token, dead = never fired on
it (the run's own dead fraction at the end of training, over its dead window, is printed next to it).
One seed per cell; run-to-run noise is not measured here, so read small differences with care.

Sections: ``--section l0fvu`` (this table), ``masked`` (``benchmarks/masked_recovery.py``), ``itda``
(``benchmarks/itda.py``), ``all``. Arguments this script does not know are passed to those sections.

Budget: the defaults (n = 4096, 1M tokens per run, batch 1024: 976 steps, about 4 epochs of the demo
cache) take 60 to 140 s per run on an otherwise idle 2-core CPU, about 50 min for the whole
table. Larger budgets are flags; arch subsets can run in separate processes and their logs be
merged:

    .venv/bin/python benchmarks/architectures.py --archs topk,batchtopk > a.txt    # one process per subset
    .venv/bin/python benchmarks/architectures.py --from-logs a.txt b.txt ...      # the merged tables

Run:   .venv/bin/python benchmarks/architectures.py --section l0fvu            # every arch, one process
       .venv/bin/python benchmarks/architectures.py --train-tokens 30000 --archs topk,batchtopk  # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from quality import export_split, fvu_l0_dead, ordered_batches, token_order  # noqa: E402

SKIP_ARCHS = {"itda"}  # not gradient-trained (matching pursuit on stored activations): its own section


def gradient_archs() -> list[str]:
    """Registered architectures the shared gradient trainer trains (they define ``loss``)."""
    from sae.base import registry

    return [name for name, mod in registry().items() if hasattr(mod, "loss") and name not in SKIP_ARCHS]


def config_for(arch: str, n: int, target: int, args: argparse.Namespace) -> Any:
    """The arch's config at target L0 ``target`` (None: this arch cannot be set to a target)."""
    import dataclasses

    from sae.base import arch_module

    cls = arch_module(arch).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    if arch == "jumprelu":
        return cls(n_latents=n, target_l0=float(target), l0_coef=args.jumprelu_coef)
    if arch == "relu_l1":
        coefs = dict(zip(args.l0, args.l1_coefs, strict=False))
        return cls(n_latents=n, l1_coef=coefs.get(target, args.l1_coefs[-1]))
    if arch == "gba":
        period = args.gba_update_tokens or cls.update_tokens
        return cls(n_latents=n, target_l0=float(target), update_tokens=period)
    if "k" in fields:
        return cls(n_latents=n, k=target)
    return None


def train_and_eval(
    cfg: Any,
    train: np.ndarray,
    order: np.ndarray,
    ev: np.ndarray,
    batch: int,
    seed: int,
    eval_ks: list[int | None],
) -> list[dict[str, Any]]:
    """Train one SAE on the shared order; held-out metrics of its saved (inference) form per k."""
    from sae.api import SAE
    from sae.trainer import TrainConfig
    from sae.trainer import train as sae_train

    steps = len(order) // batch
    tc = TrainConfig(train_tokens=steps * batch, batch_size=batch, seed=seed, log_every=max(1, steps // 5))

    t0 = time.perf_counter()
    res = sae_train(cfg, tc, ordered_batches(train, order, batch), progress=False)
    secs = time.perf_counter() - t0
    model = SAE(cfg, res.params, res.arch_state, res.d)
    out = []
    for k in eval_ks:
        m = fvu_l0_dead(lambda x, k=k: model.encode(x, k=k), model.decode, ev)
        m.update(
            seconds=secs,
            tokens=steps * batch,
            train_fvu=res.final_metrics.get("fvu", float("nan")),
            train_l0=res.final_metrics.get("l0", float("nan")),
            train_dead=res.final_metrics.get("dead_frac", float("nan")),
        )
        out.append(m)
    return out


def section_l0fvu(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="saewb_arch_bench_") as tmp:
        train = np.array(export_split(args.workspace, args.hook, "train", Path(tmp) / "train.npy"))
        ev = np.array(export_split(args.workspace, args.hook, "eval", Path(tmp) / "eval.npy"))
    if args.eval_tokens:
        ev = ev[: args.eval_tokens]
    order = token_order(len(train), args.train_tokens, args.seed)
    archs = args.archs.split(",") if args.archs else gradient_archs()
    targets = sorted(args.l0)
    print(
        f"# data: {len(train):,} train / {len(ev):,} eval tokens of {args.hook} ({args.workspace}); "
        f"n={args.n}, {len(order) // args.batch * args.batch:,} tokens per run, batch {args.batch}, "
        f"seed {args.seed}; archs {archs}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []

    def record(arch: str, target: int, detail: str, m: dict[str, Any]) -> None:
        row = {"arch": arch, "target_l0": target, "config": detail, **m}
        rows.append(row)
        print("@@" + json.dumps(row), flush=True)
        print(
            f"{arch:<18} t={target:<3} L0={m['l0']:7.2f} FVU={m['fvu']:.4f} dead={m['dead_eval']:.3f} "
            f"(training: {m['train_dead']:.3f}) ({m['seconds']:.0f}s)  {detail}",
            flush=True,
        )

    for arch in archs:
        if arch == "hierarchical_topk":
            from sae.hierarchical_topk import HierarchicalTopKConfig

            cfg = HierarchicalTopKConfig(n_latents=args.n, k=max(targets))
            for t, m in zip(
                targets,
                train_and_eval(cfg, train, order, ev, args.batch, args.seed, list(targets)),
                strict=True,
            ):
                record(arch, t, f"K={cfg.k}, evaluated at k={t}", m)
            continue
        for t in targets:
            cfg = config_for(arch, args.n, t, args)
            if cfg is None:
                print(f"{arch:<18} t={t:<3} skipped: no field sets its sparsity", flush=True)
                continue
            try:
                (m,) = train_and_eval(cfg, train, order, ev, args.batch, args.seed, [None])
            except Exception as e:  # one broken arch must not cost the whole table
                print(f"{arch:<18} t={t:<3} FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            record(arch, t, _detail(cfg), m)
    print_table(rows, targets)
    return rows


def _detail(cfg: Any) -> str:
    keys = ("k", "l1_coef", "htf", "update_tokens", "target_l0", "l0_coef")
    return ", ".join(
        f"{k}={getattr(cfg, k):.4g}" if isinstance(getattr(cfg, k), float) else f"{k}={getattr(cfg, k)}"
        for k in keys
        if getattr(cfg, k, None) is not None
    )


def print_table(rows: list[dict[str, Any]], targets: list[int]) -> None:
    print("\n## Held-out FVU (measured L0) per architecture and target L0")
    head = "| arch | " + " | ".join(f"L0≈{t}: FVU (L0)" for t in targets) + " | dead (at max t) | s/run |"
    print(head)
    print("|" + "---|" * (len(targets) + 3))
    for arch in dict.fromkeys(r["arch"] for r in rows):
        cells = []
        for t in targets:
            r = next((r for r in rows if r["arch"] == arch and r["target_l0"] == t), None)
            cells.append("-" if r is None else f"{r['fvu']:.4f} ({r['l0']:.1f})")
        last = [r for r in rows if r["arch"] == arch]
        print(
            f"| {arch} | " + " | ".join(cells) + f" | {last[-1]['dead_eval']:.3f} | "
            f"{np.median([r['seconds'] for r in last]):.0f} |"
        )
    topk = {r["target_l0"]: r for r in rows if r["arch"] == "topk"}
    hier = {r["target_l0"]: r for r in rows if r["arch"] == "hierarchical_topk"}
    if topk and hier:
        print("\n## HierarchicalTopK (one model, K = max) vs TopK trained at each k")
        print("| k | TopK FVU | HierarchicalTopK FVU | Δ (hier − topk) |")
        print("|---|---|---|---|")
        for t in targets:
            if t in topk and t in hier:
                print(
                    f"| {t} | {topk[t]['fvu']:.4f} | {hier[t]['fvu']:.4f} | {hier[t]['fvu'] - topk[t]['fvu']:+.4f} |"
                )


def table_from_logs(paths: list[Path]) -> None:
    """Re-print the tables from the ``@@`` rows of one or more logs (e.g. arch subsets run in parallel)."""
    rows = [
        json.loads(line[2:])
        for path in paths
        for line in path.read_text().splitlines()
        if line.startswith("@@")
    ]
    if not rows:
        raise SystemExit(f"no result rows (lines starting with @@) in {[str(p) for p in paths]}")
    print_table(rows, sorted({int(r["target_l0"]) for r in rows}))


def run_module_section(name: str, filename: str, argv: list[str]) -> None:
    path = HERE / filename
    if not path.exists():
        print(f"# section {name}: {path} does not exist yet; skipped", flush=True)
        return
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print(f"# section {name}: {filename}", flush=True)
    mod.main(argv)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=("l0fvu", "masked", "itda", "all"), default="l0fvu")
    p.add_argument("--workspace", type=Path, default=ROOT / "workspace.duckdb", help="read only")
    p.add_argument("--hook", default="blocks.3.hook_out")
    p.add_argument("--n", type=int, default=4096, help="latents")
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="tokens per run")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("--eval-tokens", type=int, default=0, help="cap on held-out tokens (0: the whole split)")
    p.add_argument("--l0", type=int, nargs="+", default=[16, 32, 64], help="target L0 values")
    p.add_argument(
        "--archs", default="", help="comma-separated subset (default: every gradient-trained arch)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--l1-coefs",
        type=float,
        nargs="+",
        default=[10.0, 5.0, 2.5],
        help="relu_l1 λ per target L0 (in --l0 order)",
    )
    p.add_argument("--jumprelu-coef", type=float, default=1.0, help="jumprelu l0_coef with target_l0")
    p.add_argument(
        "--gba-update-tokens", type=int, default=0, help="gba tokens between bias updates (0: its default)"
    )
    p.add_argument("--from-logs", type=Path, nargs="+", help="only re-print the tables from these logs")
    args, rest = p.parse_known_args(argv)
    if args.from_logs:
        table_from_logs(args.from_logs)
        return
    if args.section in ("l0fvu", "all"):
        if rest and args.section == "l0fvu":
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        section_l0fvu(args)
    if args.section in ("masked", "all"):
        run_module_section("masked", "masked_recovery.py", rest)
    if args.section in ("itda", "all"):
        run_module_section("itda", "itda.py", rest)


if __name__ == "__main__":
    main()
