"""EleutherAI sparsify side of the speed benchmark; runs with the ``.bench-venvs/sparsify`` interpreter.

sparsify's ``Trainer`` is wired to a Hugging Face model and dataset, so this drives the same public
pieces its training step uses on a fixed activation batch: ``SparseCoder`` (fused TopK encoder with
its index_add backward, embedding-bag decoder), the unit-norm decoder projection, and the default
optimizer of ``TrainConfig`` ("signum": schedule-free SignSGD, with its default learning rate), or
``--optimizer adam`` (torch Adam + linear warmup schedule as in the Trainer).

    python _peer_sparsify.py speed --d 384 --n 16384 --k 32 --batch 4096 [--optimizer signum|adam]
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer_common import serve_speed, speed_parser  # noqa: E402


def cmd_speed(a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randn(a.batch, a.d, generator=gen) for _ in range(4)]
    sae = SparseCoder(a.d, SparseCoderConfig(num_latents=a.n, k=a.k), device="cpu", dtype=torch.float32)
    scale = (sae.num_latents / 2**14) ** 0.5
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    if a.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        opt: torch.optim.Optimizer = ScheduleFreeWrapper(
            SignSGD([dict(params=sae.parameters(), lr=5e-3 / scale)]), momentum=0.95
        )
        opt.train()
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / scale)])
        schedulers.append(get_linear_schedule_with_warmup(opt, 1000, 10**9))
    # Dead-latent bookkeeping as in Trainer.fit (AuxK off: auxk_alpha defaults to 0).
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    i = 0

    def step() -> None:
        nonlocal i
        x = pool[i % len(pool)]
        i += 1
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    for _ in range(a.warmup):
        step()
    serve_speed(
        step,
        {"impl": "sparsify", "version": version("eai-sparsify"), "threads": torch.get_num_threads()},
    )


def main() -> None:
    p, sub, s = speed_parser()
    s.add_argument("--optimizer", choices=["signum", "adam"], default="signum")
    a = p.parse_args()
    cmd_speed(a)


if __name__ == "__main__":
    main()
