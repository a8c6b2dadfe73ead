"""Half-precision activation storage, and training from the model on the fly (no cache)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from activations.harvest import HarvestConfig, run_harvest
from activations.reader import read_activations
from activations.store import HarvestError, decode, encode, harvest_info
from activations.stream import ActivationStream
from sae.cli import plan_from_values, run_plan
from saewb.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_out"


def test_bfloat16_and_float16_encoding_round_to_nearest() -> None:
    x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) * 100
    x[0, :4] = [0.0, -0.0, 1e-40, 3.3895314e38]  # zero, sign, a denormal, near bfloat16's max
    for dtype, reference in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        back = decode(encode(x, dtype), dtype)
        assert back.dtype == np.float32
        with np.errstate(over="ignore"):  # 3.4e38 is past float16's range: inf in both
            expected = x.astype(reference).astype(np.float32)
        np.testing.assert_array_equal(back, expected, err_msg=dtype)


def test_half_precision_cache_round_trips_and_trains_no_worse_than_float32(tmp_path: Path) -> None:
    stored: dict[str, np.ndarray] = {}
    fvu: dict[str, float] = {}
    for dtype in ("float32", "float16"):
        ws = tmp_path / f"{dtype}.duckdb"
        cfg = HarvestConfig(
            model="tiny-lm", hooks=(HOOK,), ctx_len=64, max_tokens=4000, commit_tokens=1500, store_dtype=dtype
        )
        info = run_harvest(cfg, ws, progress=False)
        assert info.store_dtype == dtype and info.config["identity"]["dtype"] == dtype
        files = sorted((ws.with_suffix(".acts")).rglob("*.bin"))
        width = 2 if dtype == "float16" else 4
        assert sum(f.stat().st_size for f in files) == info.n_tokens * info.hooks[HOOK] * width
        _, stored[dtype] = read_activations(Workspace(ws), info.tables[HOOK], 0, info.n_tokens)
        # The trainer's batches stay in the store dtype (widened on its device); others are float32.
        as_stored, as_float = (
            next(ActivationStream(ws, HOOK, batch_size=256, seed=1, values=v).batches())
            for v in ("stored", "float32")
        )
        assert as_stored.dtype == dtype and as_float.dtype == np.float32
        np.testing.assert_array_equal(as_stored.astype(np.float32), as_float)
        final = run_plan(
            plan_from_values(
                {
                    "workspace": str(ws),
                    "hook": HOOK,
                    "arch": "topk",
                    "n_latents": 128,
                    "k": 8,
                    "train_tokens": 16_384,
                    "batch_size": 512,
                    "seed": 0,
                    "name": "r",
                    "progress": False,
                    "eval_tokens": 4096,
                }
            )
        )
        fvu[dtype] = final["fvu"]
    assert stored["float16"].dtype == np.float32  # read back as float32
    # The same forward passes: the float16 cache holds exactly the float32 values rounded to float16.
    np.testing.assert_array_equal(stored["float16"], stored["float32"].astype(np.float16).astype(np.float32))
    assert not np.array_equal(stored["float16"], stored["float32"])
    # no worse than float32 (a 32-step run: either may come out ahead by a few thousandths)
    assert fvu["float16"] - fvu["float32"] < 0.002, fvu
    # A resumed harvest keeps its store dtype; asking for another one is refused.
    again = run_harvest(
        HarvestConfig(model="tiny-lm", hooks=(HOOK,), ctx_len=64, max_tokens=4000, commit_tokens=1500),
        tmp_path / "float16.duckdb",
        progress=False,
    )
    assert again.store_dtype == "float16"
    with pytest.raises(HarvestError, match="dtype: stored 'float16', now 'bfloat16'"):
        run_harvest(
            HarvestConfig(
                model="tiny-lm", hooks=(HOOK,), ctx_len=64, max_tokens=4000, store_dtype="bfloat16"
            ),
            tmp_path / "float16.duckdb",
            progress=False,
        )


LIVE = {
    "from_model": "tiny-lm",
    "corpus": "stdlib-docs",
    "hook": HOOK,
    "ctx_len": 32,
    "shuffle_tokens": 1024,
    "arch": "topk",
    "n_latents": 64,
    "k": 4,
    "train_tokens": 40 * 128,
    "batch_size": 128,
    "log_every": 8,
    "ckpt_every": 8,
    "eval_tokens": 512,
    "name": "live",
}


def _argv(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _params(ws: Path, run: str = "live") -> dict[str, np.ndarray]:
    import sae
    from sae.checkpoint import flatten

    return flatten(sae.load(run, workspace=ws).params)


def _kill_once_written(argv: list[str], path: Path) -> None:
    """Run `saewb argv` and SIGKILL it as soon as `path` exists (a checkpoint: mid-run)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saewb.cli", *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def live_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An uninterrupted `saewb train --from-model` run of LIVE: its workspace and final metrics."""
    clean = tmp_path_factory.mktemp("live") / "clean.duckdb"
    return clean, run_plan(plan_from_values({**LIVE, "workspace": str(clean), "progress": False}))


def test_training_from_the_model_resumes_exactly_after_sigkill(
    tmp_path: Path, live_reference: tuple[Path, dict]
) -> None:
    from sae import checkpoint as ckpt
    from sae import runs

    (clean, reference), killed = live_reference, tmp_path / "killed.duckdb"
    run_dir = Workspace(killed).runs_dir / "live"
    _kill_once_written(
        ["train", *_argv({**LIVE, "workspace": killed}), "--no-progress"], run_dir / "checkpoints" / "LATEST"
    )
    step = int(ckpt.read_manifest(ckpt.latest_checkpoint(run_dir))["step"])
    assert 0 < step < 40, f"killed at step {step}: not mid-run"
    assert runs.get_run(Workspace(killed), "live")["status"] == "running"

    resumed = run_plan(plan_from_values({**LIVE, "workspace": str(killed), "progress": False}))
    speed = "train_tokens_per_s"
    assert {k: v for k, v in resumed.items() if k != speed} == {
        k: v for k, v in reference.items() if k != speed
    }
    a, b = _params(killed), _params(clean)
    for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    steps = [r["step"] for r in runs.run_metrics(Workspace(killed), "live")]
    assert steps == list(range(8, 41, 8))  # no step logged twice, none missing
    row = runs.get_run(Workspace(killed), "live")
    assert row["status"] == "done" and row["config"]["from_model"]["model"] == "tiny-lm"
    assert harvest_names_empty(killed)


SWEEP = {
    "name": "sw",
    "hook": HOOK,
    "arch": "topk",
    "eval_tokens": LIVE["eval_tokens"],
    "from_model": {
        "model": LIVE["from_model"],
        **{k: LIVE[k] for k in ("corpus", "ctx_len", "shuffle_tokens")},
    },
    "train": {k: LIVE[k] for k in ("train_tokens", "batch_size", "log_every", "ckpt_every")},
    "members": [
        {"name": "a", "n_latents": LIVE["n_latents"], "k": LIVE["k"]},
        {"name": "b", "n_latents": 32, "k": 2},
    ],
}


def test_a_from_model_sweep_trains_every_member_on_the_train_runs_tokens_and_resumes(
    tmp_path: Path, live_reference: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two SAEs from one on-the-fly forward pass (`saewb sweep` with `from_model:`), interrupted
    (Ctrl-C) mid-run and run again: member `a` (LIVE's config) ends with the parameters of the
    uninterrupted `saewb train --from-model` run, so it saw the same tokens in the same order, and so
    did `b` (one stream). In this process: a SIGKILLed sweep resumes from the same state file
    (tests/test_sweep.py), and a SIGKILLed run from the model is the test above."""
    import yaml

    from sae import runs, sweep
    from saewb.cli import main

    ws = tmp_path / "sweep.duckdb"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, "workspace": str(ws)}))
    state = Workspace(ws).runs_dir / ".sweeps" / "sw.json"  # the first checkpoint of both members is in

    real_replace = os.replace

    def replace_then_interrupt(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(dst) == state:  # Ctrl-C just after the sweep recorded its first step; a thread polling
            monkeypatch.setattr(sweep.os, "replace", real_replace)  # for it lost that race under load
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep.os, "replace", replace_then_interrupt)
    assert main(["sweep", str(config), "--no-progress"]) == 130  # "interrupted; run the same command again"
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 40, f"interrupted at step {step}: not mid-run"
    assert main(["sweep", str(config), "--no-progress"]) == 0

    clean, reference = live_reference
    solo = _params(clean)
    for key, value in _params(ws, "sw-a").items():
        np.testing.assert_allclose(value, solo[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for member in ("sw-a", "sw-b"):
        row = runs.get_run(Workspace(ws), member)
        assert row["status"] == "done" and row["config"]["from_model"]["model"] == "tiny-lm"
        metrics = runs.run_metrics(Workspace(ws), member)
        assert [r["step"] for r in metrics] == list(range(8, 41, 8))  # none logged twice, none missing
        assert metrics[-1]["tokens"] == LIVE["train_tokens"]
    a = runs.get_run(Workspace(ws), "sw-a")["final_metrics"]
    assert a["fvu"] == pytest.approx(reference["fvu"], rel=1e-4)
    assert harvest_names_empty(ws)


def harvest_names_empty(ws: Path) -> bool:
    """No harvest was made: the activations never touched the workspace."""
    from activations.store import harvest_names

    return harvest_names(Workspace(ws)) == []


def test_from_model_options_are_refused_without_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only apply with --from-model"):
        plan_from_values(
            {
                "workspace": str(tmp_path / "w.duckdb"),
                "hook": HOOK,
                "arch": "topk",
                "name": "x",
                "corpus": "a.txt",
            }
        )
    assert harvest_info  # imported for the harvest test above
