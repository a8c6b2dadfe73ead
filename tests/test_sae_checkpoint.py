"""Checkpoints: bit-for-bit resume after SIGKILL, atomic writes, corruption detected. Every
architecture's mid-run resume (bit for bit) and the different-config refusal:
tests/test_arch_conformance.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sae import checkpoint as ckpt
from sae.topk import TopKConfig
from sae.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from sae.topk import TopKConfig
    from sae.trainer import TrainConfig, train

    run_dir, delay = sys.argv[1], float(sys.argv[2])

    def batches(start):
        step = start
        while True:
            if delay:
                time.sleep(delay)  # slow the data so the parent can kill mid-run
            r = np.random.default_rng([5, step])
            yield (r.standard_normal((64, 16)) * np.linspace(0.5, 2, 16) + 1).astype(np.float32)
            step += 1

    cfg = TopKConfig(n_latents=64, k=4)
    tc = TrainConfig(train_tokens=64 * 40, batch_size=64, seed=3, log_every=5, ckpt_every=5,
                     init_sample_tokens=256, dead_window_tokens=128)
    train(cfg, tc, batches, run_dir=run_dir, progress=False)
    """
)


def _worker(run_dir: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(run_dir), str(delay)], env=env, cwd=ROOT)


def _final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None
    out = {}
    for name in ("params", "opt_state", "state"):
        for k, v in load_file(str(latest / f"{name}.safetensors")).items():
            out[f"{name}/{k}"] = v
    return out


def test_sigkill_and_resume_is_bit_for_bit(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = _worker(killed, delay=0.15)
    pointer = killed / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if pointer.exists() and pointer.read_text().strip() >= "step_000000010":
            break
        assert proc.poll() is None, "worker ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = int(ckpt.read_manifest(ckpt.latest_checkpoint(killed))["step"])
    assert 10 <= step_at_kill < 40

    resumed = _worker(killed, delay=0.0)
    reference = _worker(tmp_path / "reference", delay=0.0)
    assert resumed.wait(timeout=300) == 0
    assert reference.wait(timeout=300) == 0

    a, b = _final_arrays(killed), _final_arrays(tmp_path / "reference")
    assert a.keys() == b.keys()
    assert int(a["state/['step']"][0]) == 40
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and the exported SAE too
    fa = load_file(str(killed / "sae" / "params.safetensors"))
    fb = load_file(str(tmp_path / "reference" / "sae" / "params.safetensors"))
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _tiny_run(run_dir: Path, steps: int = 10) -> None:
    def batches(start: int):
        step = start
        while True:
            yield np.random.default_rng([1, step]).standard_normal((32, 8)).astype(np.float32)
            step += 1

    cfg = TopKConfig(n_latents=16, k=2)
    tc = TrainConfig(train_tokens=32 * steps, batch_size=32, log_every=5, ckpt_every=5, init_sample_tokens=64)
    train(cfg, tc, batches, run_dir=run_dir, progress=False)


def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    _tiny_run(tmp_path / "good")
    for damage in ("truncate", "flip", "delete", "manifest"):
        run_dir = tmp_path / damage
        shutil.copytree(tmp_path / "good", run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        assert latest is not None
        target = latest / "opt_state.safetensors"
        if damage == "truncate":
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data = bytearray(target.read_bytes())
            data[-3] ^= 0xFF
            target.write_bytes(bytes(data))
        elif damage == "delete":
            target.unlink()
        else:
            (latest / "manifest.json").write_text("{not json")
        with pytest.raises(ckpt.CheckpointError) as err:
            _tiny_run(run_dir)  # resuming must fail loudly, never start over
        assert str(latest) in str(err.value), damage


def test_a_kill_between_the_checkpoint_and_its_pointer_resumes_from_it(tmp_path: Path) -> None:
    """A writer killed after renaming step_N into place but before writing LATEST (the first checkpoint
    has no older pointer): the newest step directory is the checkpoint, and the run resumes from it."""
    _tiny_run(tmp_path / "reference")
    run_dir = tmp_path / "killed"
    _tiny_run(run_dir)
    cdir = ckpt.checkpoints_dir(run_dir)
    shutil.rmtree(cdir / "step_000000010")  # as if killed before writing it
    (cdir / "LATEST").unlink()  # and then killed after step 5's rename, before its pointer
    assert ckpt.latest_checkpoint(run_dir) == cdir / "step_000000005"
    _tiny_run(run_dir)
    assert ckpt.read_bundle(ckpt.latest_checkpoint(run_dir))[1]["step"] == 10
    fa, fb = (
        ckpt.read_bundle(ckpt.latest_checkpoint(d))[0]["params"] for d in (run_dir, tmp_path / "reference")
    )
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_killed_writer_leaves_previous_checkpoint(tmp_path: Path) -> None:
    _tiny_run(tmp_path)
    cdir = ckpt.checkpoints_dir(tmp_path)
    before = ckpt.latest_checkpoint(tmp_path)
    # a writer killed mid-way leaves only a temp dir; it is ignored and LATEST still points at a whole one
    (cdir / ".tmp-step_000000099-x").mkdir()
    (cdir / ".tmp-step_000000099-x" / "params.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == before
    trees, manifest = ckpt.read_bundle(before)
    assert manifest["step"] == 10 and "params" in trees
