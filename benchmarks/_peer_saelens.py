"""SAELens side of the benchmarks; runs with the ``.bench-venvs/saelens`` interpreter.

Uses SAELens's public training API only: ``TopKTrainingSAE`` + ``SAETrainer`` (its Adam, grad-norm
clipping, LR scheduler, dead-latent bookkeeping and AuxK), fed from an in-memory iterator.

    speed:   python _peer_saelens.py speed --d 384 --n 16384 --k 32 --batch 4096 [--sparse-acts]
    quality: python _peer_saelens.py quality --train tr.npy --eval ev.npy --order ord.npy ...
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sae_lens import __version__ as saelens_version
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer_common import emit, serve_speed, speed_parser  # noqa: E402


def make_trainer(
    d: int,
    n: int,
    k: int,
    batch: int,
    total_tokens: int,
    provider: Iterator[torch.Tensor],
    *,
    sparse_acts: bool,
    lr: float,
    dead_window_steps: int,
    normalize: bool = False,
) -> SAETrainer[Any, Any]:
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d,
        d_sae=n,
        k=k,
        dtype="float32",
        device="cpu",
        use_sparse_activations=sparse_acts,
        normalize_activations="expected_average_only_in" if normalize else "none",
    )
    sae = TopKTrainingSAE(sae_cfg)
    tr_cfg = SAETrainerConfig(
        total_training_samples=total_tokens,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr / 10,  # the runner config's default; unused by the default constant schedule
        device="cpu",
        dead_feature_window=dead_window_steps,
        # Only the last window's stats matter here; no checkpoints, no wandb (config default).
        feature_sampling_window=max(dead_window_steps, 1),
    )
    return SAETrainer(cfg=tr_cfg, sae=sae, data_provider=provider)


def cmd_speed(a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randn(a.batch, a.d, generator=gen) for _ in range(4)]
    trainer = make_trainer(
        a.d, a.n, a.k, a.batch, 10**12, iter(()), sparse_acts=a.sparse_acts, lr=3e-4, dead_window_steps=1000
    )
    i = 0

    def step() -> None:
        nonlocal i
        trainer.step(pool[i % len(pool)])
        trainer.n_training_steps += 1  # fit() does this; step() leaves it to the caller
        i += 1

    for _ in range(a.warmup):
        step()
    serve_speed(step, {"impl": "saelens", "version": saelens_version, "threads": torch.get_num_threads()})


def batches(train: np.ndarray, order: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    """The exact token order the driver chose (shared with our trainer); cycles if asked for more."""
    while True:
        for s in range(0, len(order) - batch + 1, batch):
            yield torch.from_numpy(np.ascontiguousarray(train[order[s : s + batch]]))


@torch.no_grad()
def evaluate(trainer: SAETrainer[Any, Any], ev: np.ndarray, chunk: int = 4096) -> dict[str, float]:
    """Held-out FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² (μ = held-out mean), L0, never-fired fraction."""
    sae = trainer.sae
    sae.eval()
    err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for s in range(0, len(ev), chunk):
        x = torch.from_numpy(ev[s : s + chunk])
        f = sae.encode(x)
        if f.is_sparse:
            f = f.to_dense()
        x_hat = sae.decode(f)
        err += float(((x.double() - x_hat.double()) ** 2).sum())
        nz = f != 0
        l0 += float(nz.sum())
        fired |= nz.any(0)
    evd = ev.astype(np.float64)
    var = float(((evd - evd.mean(0)) ** 2).sum())
    return {
        "fvu": err / var,
        "l0": l0 / len(ev),
        "dead_eval": float((~fired).float().mean()),
        "dead_train": float(trainer.dead_neurons.float().mean()),
    }


def cmd_quality(a: argparse.Namespace) -> None:
    torch.manual_seed(a.seed)
    train = np.load(a.train, mmap_mode="r")
    ev = np.load(a.eval).astype(np.float32)
    order = np.load(a.order)
    d = train.shape[1]
    total = (len(order) // a.batch) * a.batch
    trainer = make_trainer(
        d,
        a.n,
        a.k,
        a.batch,
        total,
        batches(train, order, a.batch),
        sparse_acts=False,
        lr=a.lr,
        dead_window_steps=max(1, math.ceil(a.dead_window_tokens / a.batch)),
        normalize=a.normalize,
    )
    if a.normalize:
        # SAELens's "expected_average_only_in" (E‖x‖ = √d), computed here on the training set
        # rather than by fit(), which would draw (and so shift) batches from the shared stream.
        sample = np.asarray(train[: min(len(train), 200_000)], dtype=np.float64)
        trainer.activation_scaler.scaling_factor = float(math.sqrt(d) / np.linalg.norm(sample, axis=1).mean())
    t0 = time.perf_counter()
    trainer.fit()
    secs = time.perf_counter() - t0
    res = evaluate(trainer, ev)
    if a.save:
        trainer.sae.save_inference_model(a.save)  # folds the decoder norms when the top-k used them
    emit(
        {
            "impl": "saelens",
            "version": saelens_version,
            "seconds": secs,
            "tokens": total,
            "steps": trainer.n_training_steps,
            **res,
        }
    )


def main() -> None:
    p, sub, s = speed_parser()
    s.add_argument("--sparse-acts", action="store_true", help="SAELens use_sparse_activations=True")
    q = sub.add_parser("quality")
    q.add_argument("--train", required=True)
    q.add_argument("--eval", required=True)
    q.add_argument("--order", required=True)
    q.add_argument("--n", type=int, default=4096)
    q.add_argument("--k", type=int, default=32)
    q.add_argument("--batch", type=int, default=4096)
    q.add_argument("--lr", type=float, default=3e-4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dead-window-tokens", type=int, default=10_000_000)
    q.add_argument("--normalize", action="store_true")
    q.add_argument("--save", help="write the trained SAE here (SAELens's save_inference_model)")
    a = p.parse_args()
    cmd_speed(a) if a.cmd == "speed" else cmd_quality(a)


if __name__ == "__main__":
    main()
