"""Torch dense encoder matmul (x[B, d] @ W_enc[d, n], fp32, forward only): the physical bound in torch.

Run in its own process so torch's OpenMP threads never share a process with JAX's thread pool.

    python _peer_torch.py speed --d 384 --n 16384 --batch 4096
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer_common import serve_speed, speed_parser  # noqa: E402


def main() -> None:
    p, sub, s = speed_parser()
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.d, generator=gen)
    w = torch.randn(a.d, a.n, generator=gen) / a.d**0.5

    @torch.no_grad()
    def step() -> None:
        x @ w  # fresh output each call, as the JAX version does

    for _ in range(a.warmup):
        step()
    serve_speed(
        step, {"impl": "torch-matmul", "version": torch.__version__, "threads": torch.get_num_threads()}
    )


if __name__ == "__main__":
    main()
