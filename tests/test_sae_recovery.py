"""A fast, small version of benchmarks/recovery.py: GBA recovers the ground-truth features."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import recovery  # noqa: E402

from sae.gba import GBAConfig  # noqa: E402


def test_gba_recovers_features_small() -> None:
    """The paper's tied model recovers 90% of the features at cosine 0.9 over two seeds (one seed moves
    by a feature or two: 0.875 / 0.969 at seeds 0 / 1 with the default band 1, 0.906 / 0.938 with 1.5);
    the default untied one (better FVU on real activations, docs/learning_rate.md) at 0.8 (1.0 here)."""
    setting = recovery.Setting("small", n_features=32, d=24, sparsities=(2, 4))
    cfg = GBAConfig(n_latents=128, htf=0.5, update_tokens=2560, tied=True)
    frr9 = [recovery.run_one(cfg, setting, seed=seed, steps=600, batch=256)[1] for seed in (0, 1)]
    assert sum(frr9) / 2 >= 0.9, frr9
    frr8, frr9_untied = recovery.run_one(
        dataclasses.replace(cfg, tied=False), setting, seed=0, steps=600, batch=256
    )
    assert frr8 >= 0.9, (frr8, frr9_untied)


def test_frr_metric() -> None:
    v = recovery.ground_truth(recovery.Setting("t", 8, 32, (1,)), seed=1)
    assert recovery.frr(v, v) == (1.0, 1.0)
    assert recovery.frr(v, -v) == (0.0, 0.0)  # anti-aligned atoms are not recoveries
    rot = v + 0.6 * recovery.ground_truth(recovery.Setting("t", 8, 32, (1,)), seed=2)
    frr8, frr9 = recovery.frr(v, rot)
    assert frr8 >= frr9
