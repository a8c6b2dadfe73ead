"""Train-step throughput of our TopK SAE against SAELens and EleutherAI sparsify (issue 3, proof 2).

Same machine, same invocation, same shapes (default d=384, n=16384, k=32, batch 4096, fp32). Every
implementation is set up once (peers in their own virtualenvs, as worker subprocesses), warmed up,
then timed in interleaved rounds: round r times each implementation once, so machine noise lands on
all of them alike. Each timing is ``steps`` consecutive train steps; tokens/s = batch·steps/seconds.
Reported: the median over rounds (>= 5), min and max, and ratios of medians.

Implementations:
  ours (jax)        one jitted ``sae.trainer.Trainer`` step: TopK + AuxK loss, sparse backward,
                    decoder-grad projection, clip, Adam + schedule, renorm, dead counters.
  saelens           ``TopKTrainingSAE`` + ``SAETrainer.step`` (its Adam, clipping, scheduler, AuxK).
  sparsify          ``SparseCoder`` forward/backward + its default optimizer (schedule-free SignSGD)
                    and unit-norm decoder handling, as in ``sparsify.Trainer``.
  matmul (jax/torch) x[B, d] @ W_enc[d, n] forward alone: the physical bound of any TopK step,
                    which must compute the dense encoder product to pick the top k.

Setup (once):  bash benchmarks/peers_setup.sh     # creates .bench-venvs/{saelens,sparsify}
Run:           .venv/bin/python benchmarks/train_speed.py            # full, a few minutes on 2 cores
               .venv/bin/python benchmarks/train_speed.py --quick    # ~1 minute smoke run (smaller n, batch)
Missing peer venvs are reported as such and skipped. ``--json PATH`` also writes the raw timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = ROOT / ".bench-venvs"
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `sae` lives at the repo root

PREFIX = "@@"

from saewb.hugepages import reexec_with_huge_pages  # noqa: E402 - after the path insert


@dataclass
class Timed:
    """One implementation under test: ``rep(steps)`` returns the wall seconds of ``steps`` steps."""

    name: str
    framework: str
    kind: str  # "train" or "bound"
    rep: Callable[[int], float] | None = None
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    steps: int = 1
    seconds: list[float] = field(default_factory=list)


class Worker:
    """A peer worker process speaking the ``_peer_common`` line protocol."""

    def __init__(self, python: Path, script: str, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [str(python), str(HERE / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        err = self.proc.stderr.read() if self.proc.stderr else ""
        tail = " | ".join(s for s in err.strip().splitlines()[-3:])
        raise RuntimeError(f"worker exited (rc={self.proc.wait()}): {tail[-400:]}")

    def rep(self, steps: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"rep {steps}\n")
        self.proc.stdin.flush()
        return float(self.read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def peer(
    name: str, framework: str, kind: str, venv: str | None, script: str, args: list[str]
) -> tuple[Timed, Worker | None]:
    python = Path(sys.executable) if venv is None else VENVS / venv / "bin" / "python"
    t = Timed(name, framework, kind)
    if not python.exists():
        t.error = f"venv missing ({python.parent.parent}); run benchmarks/peers_setup.sh"
        return t, None
    return t, Worker(python, script, args)


def ours_topk(
    d: int,
    n: int,
    k: int,
    batch: int,
    warmup: int,
    dead_frac: float = 0.0,
    k_aux_min_frac: float | None = None,
) -> Timed:
    """Our TopK train step; with ``dead_frac`` that share of the latents is dead (their encoder bias far
    below any pre-activation, their counters past the window), so every step runs AuxK over
    ``k_aux_min_frac``·n of them (the config's default when None)."""
    import jax
    import numpy as np

    from sae import common
    from sae.topk import TopKConfig
    from sae.trainer import TrainConfig, Trainer

    widths = {} if k_aux_min_frac is None else {"k_aux_min_frac": k_aux_min_frac}
    cfg = TopKConfig(n_latents=n, k=k, **widths)
    # A huge token budget: the schedule stays in its flat part and no latent reaches the dead window.
    tc = TrainConfig(train_tokens=batch * 10**8, batch_size=batch)
    trainer = Trainer(cfg, tc, d)
    rng = np.random.default_rng(1)
    pool = [jax.numpy.asarray(rng.standard_normal((batch, d), dtype=np.float32)) for _ in range(4)]
    ts = trainer.init_state(np.asarray(pool[0]))
    name = "ours TopK"
    if dead_frac > 0:
        dead = np.arange(n) < round(dead_frac * n)
        b_enc = np.where(dead, -1e4, np.asarray(ts.params.b_enc)).astype(np.float32)
        since = np.where(dead, 2**30, np.asarray(ts.since_fired)).astype(np.int32)
        ts = ts.replace(
            params=ts.params.replace(b_enc=jax.numpy.asarray(b_enc)), since_fired=jax.numpy.asarray(since)
        )
        width = common.aux_width(cfg.k_aux, d, n, cfg.k_aux_min_frac)
        name = f"ours TopK, {100 * dead_frac:.0f}% dead, AuxK over {width}"
    state = {"ts": ts, "i": 0}
    scale = 1.0

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        ts = state["ts"]
        for _ in range(steps):
            ts = trainer.step(ts, pool[state["i"] % len(pool)], scale)
            state["i"] += 1
        jax.block_until_ready(ts)
        state["ts"] = ts
        return time.perf_counter() - t0

    run(warmup)  # compiles
    return Timed(name, f"jax {jax.__version__}", "train", rep=run, info={"devices": str(jax.devices())})


def jax_matmul(d: int, n: int, batch: int, warmup: int) -> Timed:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, d), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((d, n), dtype=np.float32) / np.sqrt(d))
    f = jax.jit(lambda x, w: x @ w)

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        out = None
        for _ in range(steps):
            out = f(x, w)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    run(warmup)
    return Timed("encoder matmul (jax)", f"jax {jax.__version__}", "bound", rep=run)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: n=4096, batch=1024, 5 short rounds")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--n", type=int, default=None, help="latents (default 16384; 4096 with --quick)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--batch", type=int, default=None, help="tokens per step (default 4096; 1024 with --quick)"
    )
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; 5 with --quick)")
    p.add_argument("--rep-seconds", type=float, default=None, help="target seconds per timing (sets steps)")
    p.add_argument("--no-peers", action="store_true", help="time only ours and the matmul bounds")
    p.add_argument("--sparsify-adam", action="store_true", help="also time sparsify with its Adam option")
    p.add_argument("--json", type=Path, default=None, help="write raw timings here")
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="also time our step with this share of the latents dead, at each --aux-fracs AuxK width",
    )
    p.add_argument(
        "--aux-fracs",
        type=float,
        nargs="+",
        default=[1 / 16, 1 / 4],
        help="k_aux_min_frac values timed with --dead-frac (AuxK over max(d/2, frac·n) latents)",
    )
    a = p.parse_args()
    reexec_with_huge_pages()  # as the saewb program runs; the peer workers inherit it too
    n = a.n or (4096 if a.quick else 16384)
    batch = a.batch or (1024 if a.quick else 4096)
    reps = a.reps or (5 if a.quick else 7)
    target = a.rep_seconds or (0.3 if a.quick else 2.0)
    warm = "1" if a.quick else "2"
    d, k = a.d, a.k
    shape = ["--d", str(d), "--n", str(n), "--batch", str(batch), "--warmup", warm]

    # Peers first: their setup (imports, allocation, warmup) overlaps ours.
    specs: list[tuple[Timed, Worker | None]] = [
        peer("encoder matmul (torch)", "torch", "bound", None, "_peer_torch.py", ["speed", *shape]),
    ]
    if not a.no_peers:
        specs.append(
            peer(
                "SAELens TopK",
                "torch",
                "train",
                "saelens",
                "_peer_saelens.py",
                ["speed", *shape, "--k", str(k)],
            )
        )
        specs.append(
            peer(
                "sparsify TopK (signum)",
                "torch",
                "train",
                "sparsify",
                "_peer_sparsify.py",
                ["speed", *shape, "--k", str(k)],
            )
        )
        if a.sparsify_adam:
            specs.append(
                peer(
                    "sparsify TopK (adam)",
                    "torch",
                    "train",
                    "sparsify",
                    "_peer_sparsify.py",
                    ["speed", *shape, "--k", str(k), "--optimizer", "adam"],
                )
            )
    timed: list[Timed] = [jax_matmul(d, n, batch, int(warm)), ours_topk(d, n, k, batch, int(warm))]
    if a.dead_frac > 0:
        timed += [ours_topk(d, n, k, batch, int(warm), a.dead_frac, f) for f in a.aux_fracs]
    for t, w in specs:
        if w is not None:
            try:
                info = w.read()
                t.framework = (
                    f"{info['impl']} {info['version']}" if t.kind == "train" else f"torch {info['version']}"
                )
                t.info = info
                t.rep, t.close = w.rep, w.close
            except RuntimeError as e:
                t.error = str(e)
                w.close()
        timed.append(t)
    live = [t for t in timed if t.rep is not None]

    # Calibrate steps per timing so each lasts about `target` seconds.
    for t in live:
        assert t.rep is not None
        one = t.rep(1)
        t.steps = max(1, round(target / max(one, 1e-6)))
    for r in range(reps):
        for t in live:
            assert t.rep is not None
            t.seconds.append(t.rep(t.steps))
        print(f"round {r + 1}/{reps} done", file=sys.stderr, flush=True)
    for t in timed:
        t.close()

    def tps(t: Timed) -> list[float]:
        return [batch * t.steps / s for s in t.seconds]

    med = {t.name: median(tps(t)) for t in live}
    ours = med.get("ours TopK", float("nan"))
    print(
        f"\n### Train-step throughput: d={d}, n={n}, k={k}, batch={batch}, fp32, CPU "
        f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})\n"
    )
    pages = os.environ.get("GLIBC_TUNABLES", "") or "unset (4 kB pages)"
    print(
        f"{reps} interleaved rounds; each timing = `steps` consecutive steps; tokens/s median [min, max]. "
        f"Every implementation ran with GLIBC_TUNABLES={pages} (see saewb/hugepages.py; "
        "SAEWB_NO_HUGEPAGES=1 turns it off).\n"
    )
    print(
        "| implementation | framework | steps/timing | tokens/s (median) | [min, max] | ms/step | ours ÷ this |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for t in timed:
        if t.rep is None:
            print(f"| {t.name} | {t.framework} | – | – | – | – | {t.error} |")
            continue
        xs = tps(t)
        m = med[t.name]
        print(
            f"| {t.name} | {t.framework} | {t.steps} | {m:,.0f} | [{min(xs):,.0f}, {max(xs):,.0f}] | "
            f"{1000 * batch / m:,.1f} | {ours / m:.2f}× |"
        )

    def goal(label: str, peer_name: str, want: float, as_pct: bool = False) -> None:
        if peer_name not in med:
            print(f"| {label} | – | not measured |")
            return
        r = ours / med[peer_name]
        shown = f"{100 * r:.0f}%" if as_pct else f"{r:.2f}×"
        need = f"{100 * want:.0f}%" if as_pct else f"{want}×"
        print(f"| {label} (goal ≥ {need}) | {shown} | {'met' if r >= want else 'MISSED'} |")

    print("\n| goal | measured | status |")
    print("|---|---:|---|")
    goal("ours vs SAELens", "SAELens TopK", 5.0)
    goal("ours vs sparsify", "sparsify TopK (signum)", 1.5)
    goal("ours vs jax encoder-matmul bound", "encoder matmul (jax)", 0.4, as_pct=True)
    if a.json is not None:
        a.json.write_text(
            json.dumps(
                {
                    "shape": {"d": d, "n": n, "k": k, "batch": batch},
                    "reps": reps,
                    "results": [
                        {
                            "name": t.name,
                            "framework": t.framework,
                            "steps": t.steps,
                            "seconds": t.seconds,
                            "error": t.error,
                        }
                        for t in timed
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
