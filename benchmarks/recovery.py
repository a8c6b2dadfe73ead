"""Proof 1: feature recovery on the synthetic data model of the GBA paper (Chen et al. 2025).

Ground truth: V ∈ R^{n×d} with Gaussian rows normalised to unit length; each sample draws s distinct
features with non-negative coefficients h (uniform on [0, 1]) and x = h V. Imbalanced setting
(the paper's table): n = 128, d = 42, half the samples have s = 3 and half s = 20.
FRR@τ = share of true features whose best-matching learned atom (decoder row) has cosine ≥ τ.

Batch size matters more than steps here (GBA, seed 0, 2000 steps, lr 1e-3: FRR@0.9 80.5% at batch
256, 85.2% with 8000 steps at 256, 88.3% at 1024, 99.2% at 4096): the frequency counters the bias
updates read, over T = 10 steps, are noisy with small batches. Hence the default batch of 4096.

Measured (defaults, 3 seeds, FRR@0.8 / FRR@0.9 in %): imbalanced: GBA 100 / 95.8, BA 99.7 / 57.8,
TopK k=4 100 / 99.7, TopK k=20, 30 and 50 all 0 / 0; heavy: GBA 50.5 / 7.4, BA 57.0 / 5.6,
TopK k=4 89.8 / 46.1, TopK k=20/30/50 1.4 to 2.2 / 0. TopK recovers when k is near the true
sparsity and fails far above it; the paper's 100% for TopK k=20 (imbalanced) is not reproduced.

Run:  .venv/bin/python benchmarks/recovery.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.gba import GBAConfig  # noqa: E402
from sae.topk import TopKConfig  # noqa: E402
from sae.trainer import TrainConfig, train  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    n_features: int
    d: int
    sparsities: tuple[int, ...]
    """Samples are split evenly between these numbers of active features."""


IMBALANCED = Setting("imbalanced n=128 d=42 s∈{3,20}", 128, 42, (3, 20))
HEAVY = Setting("heavy superposition n=256 d=15 (d < √n) s∈{2,4}", 256, 15, (2, 4))


def ground_truth(setting: Setting, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    v = rng.normal(size=(setting.n_features, setting.d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def sample_batch(rng: np.random.Generator, v: np.ndarray, setting: Setting, batch: int) -> np.ndarray:
    n = setting.n_features
    h = np.zeros((batch, n), np.float32)
    groups = np.array_split(np.arange(batch), len(setting.sparsities))
    for rows, s in zip(groups, setting.sparsities, strict=True):
        # s distinct features per row: the s smallest of n random keys
        keys = rng.random((len(rows), n))
        idx = np.argpartition(keys, s - 1, axis=1)[:, :s]
        h[rows[:, None], idx] = rng.random((len(rows), s), dtype=np.float32)
    return h @ v


def make_batches(v: np.ndarray, setting: Setting, batch: int, seed: int):
    def batches(start: int) -> Iterator[np.ndarray]:
        step = start
        while True:
            yield sample_batch(np.random.default_rng([seed, 11, step]), v, setting, batch)
            step += 1

    return batches


def frr(v: np.ndarray, atoms: np.ndarray, taus: tuple[float, ...] = (0.8, 0.9)) -> tuple[float, ...]:
    a = atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-12)
    best = (v @ a.T).max(axis=1)
    return tuple(float(np.mean(best >= t)) for t in taus)


def learned_atoms(res) -> np.ndarray:
    p = res.params
    if res.config.arch == "gba":
        alive = np.asarray(p.a) > 1e-6  # neurons with a = 0 contribute nothing
        return np.asarray(p.W)[alive]
    return np.asarray(p.W_dec)


def methods(n_latents: int) -> dict[str, object]:
    return {
        # T = 10 steps of the default batch (4096) instead of the paper's 50: our CPU runs are a few thousand steps, and the biases
        # must travel ~0.3 in steps of γ·r ≤ γ (0.02 by default; see the measurements in sae/gba.py).
        # HTF = 0.1 (the sheet's alternative to 0.5): the mean feature frequency of the imbalanced
        # setting is 0.09, and neurons only learn features near their target frequency (resonance).
        "GBA": GBAConfig(n_latents=n_latents, n_groups=10, htf=0.1, ltf=1e-3, update_tokens=10 * 4096),
        "BA": GBAConfig(n_latents=n_latents, n_groups=1, htf=0.1, update_tokens=10 * 4096),
        # the standard (OpenAI / sparsify) TopK with a unit-norm decoder, as the paper compares against
        # k = the largest true sparsity of the heavy setting (the paper's k values are above it)
        "TopK k=4": TopKConfig(n_latents=n_latents, k=4, decoder="unit"),
        "TopK k=20": TopKConfig(n_latents=n_latents, k=20, decoder="unit"),
        "TopK k=30": TopKConfig(n_latents=n_latents, k=30, decoder="unit"),
        "TopK k=50": TopKConfig(n_latents=n_latents, k=50, decoder="unit"),
    }


def run_one(cfg, setting: Setting, seed: int, steps: int, batch: int) -> tuple[float, float]:
    v = ground_truth(setting, seed)
    tc = TrainConfig(
        train_tokens=steps * batch,
        batch_size=batch,
        seed=seed,
        lr=1e-3,
        warmup_steps=100,
        log_every=max(1, steps // 4),
        init_sample_tokens=4096,
    )
    res = train(cfg, tc, make_batches(v, setting, batch, seed), progress=False)
    return frr(v, learned_atoms(res))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument(
        "--batch",
        type=int,
        default=4096,
        help="samples per step; FRR@0.9 of GBA rose from 80.5%% (256) to 88.3%% (1024) and 99.2%% (4096)",
    )
    ap.add_argument("--n-latents", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    ap.add_argument("--only", default=None, help="comma-separated method names")
    ap.add_argument("--settings", default="imbalanced,heavy", help="comma-separated: imbalanced, heavy")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 1000
    known = {"imbalanced": IMBALANCED, "heavy": HEAVY}
    settings = [known[name] for name in args.settings.split(",")]
    for setting in settings:
        print(
            f"\n{setting.name}; SAE width {args.n_latents}, {args.steps} steps × {args.batch}, "
            f"{args.seeds} seed(s); FRR as mean ± std over seeds"
        )
        print(f"{'method':<12} {'FRR@0.8':>14} {'FRR@0.9':>14} {'time/run':>9}")
        for name, cfg in methods(args.n_latents).items():
            if args.only and name not in args.only.split(","):
                continue
            t0 = time.time()
            vals = np.array([run_one(cfg, setting, s, args.steps, args.batch) for s in range(args.seeds)])
            dt = (time.time() - t0) / args.seeds
            m, sd = 100 * vals.mean(0), 100 * vals.std(0)
            print(
                f"{name:<12} {m[0]:6.1f} ± {sd[0]:4.1f}% {m[1]:6.1f} ± {sd[1]:4.1f}% {dt:8.1f}s", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
