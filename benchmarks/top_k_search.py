"""The TopK step's selection on CPU: top k per token, and AuxK's top k_aux among the dead latents.

Times ``sae.common.encode_top_k`` (encoder product, ReLU, bias, decoder-norm scale and the searches)
with no latent dead, and with half of them dead, two ways: the native one-pass kernels
(``native.relu_top_k`` / ``native.relu_top_k_and_dead``), and XLA (scores formed, block top-k,
``dead_top_k``'s compacted search). The dead latents either score a
ReLU'd zero on almost every token (a latent no token reaches) or are positive on about a third of
them (losing the top-k to live latents, as at n = 32768 on 250k MiniLM tokens). The encoder product
alone is the bound. Interleaved rounds, median ms per call, one process:

    taskset -c 0 python benchmarks/top_k_search.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae import common, native


def timer(f: Callable[[], object], target_s: float) -> Callable[[], float]:
    jax.block_until_ready(f())  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    reps = max(1, round(target_s / max(time.perf_counter() - t0, 1e-6)))

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / reps * 1e3

    return run


def cases(d: int, n: int, batch: int, k: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, d), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((d, n), dtype=np.float32) / np.sqrt(d))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n).astype(np.float32))
    dead = jnp.asarray(np.arange(n) % 2 == 0)
    live_bias = jnp.full(n, -1.5, jnp.float32)
    k_aux = common.aux_width(None, d, n, 1 / 16)
    out: dict[str, Callable[[], object]] = {}
    matmul = jax.jit(lambda x, w: x @ w)
    out["encoder product (bound)"] = lambda: matmul(x, w)
    # one pass: the native kernels read the encoder product; XLA: the [B, n] scores are written and
    # searched by XLA (the path on accelerators and without a compiler)
    paths = {"one pass": {}, "XLA": {"serves": lambda *a: False}}
    for path, patch in paths.items():
        real = {name: getattr(native, name) for name in patch}
        for name, fake in patch.items():
            setattr(native, name, fake)
        try:
            plain = jax.jit(lambda x, b: common.encode_top_k(x, w, b, k, scale)[:2])
            with_dead = jax.jit(lambda x, b: common.encode_top_k(x, w, b, k, scale, dead, k_aux))
            plain(x, live_bias)
            out[f"{path}: top k, none dead"] = functools.partial(plain, x, live_bias)
            for regime, dead_bias in (("dead at zero", -6.0), ("dead positive", -0.4)):
                bias = jnp.where(dead, dead_bias, live_bias)
                with_dead(x, bias)
                out[f"{path}: top k + AuxK's {k_aux}, {regime}"] = functools.partial(with_dead, x, bias)
        finally:
            for name, kept in real.items():
                setattr(native, name, kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["384:2048", "576:8192", "384:32768"], help="d:n")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rep-seconds", type=float, default=0.5)
    a = p.parse_args()
    assert native.available(), "the native kernels did not build: is g++ installed?"
    print(f"### TopK selection, batch {a.batch}, k {a.k}, fp32, CPU ({jax.device_count()} device)")
    print(f"{a.rounds} interleaved rounds, median ms per call [min, max]; half of the latents dead.\n")
    print("| d, n | path | ms | [min, max] | ÷ encoder product |")
    print("|---|---|---:|---|---:|")
    for shape in a.shapes:
        d, n = map(int, shape.split(":"))
        runs = {name: timer(f, a.rep_seconds) for name, f in cases(d, n, a.batch, a.k).items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, run in runs.items():
                times[name].append(run())
        bound = statistics.median(times["encoder product (bound)"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {d}, {n} | {name} | {med:.1f} | [{min(ts):.1f}, {max(ts):.1f}] | {med / bound:.2f}× |")


if __name__ == "__main__":
    main()
