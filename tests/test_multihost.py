"""Two real processes over loopback (``jax.distributed``, CPU devices) train like one process.

``saewb train --coordinator 127.0.0.1:PORT --num-processes 2 --process-id i`` runs twice, each
process with 2 CPU devices, on a 2 x 2 ("data", "model") mesh: the data axis spans the processes
(each reads its half of every global batch from the workspace), the model axis splits the latents
inside each process. A plain single-process run of the same config runs beside them; the loss
curves logged to the workspace and the saved SAEs must agree.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAEWB

HOOK = "blocks.1.hook_out"
BATCH = 64
TRAIN = [
    "--hook",
    HOOK,
    "--arch",
    "topk",
    "--n-latents",
    "64",
    "--k",
    "4",
    "--train-tokens",
    str(BATCH * 12),
    "--batch-size",
    str(BATCH),
    "--log-every",
    "4",
    "--ckpt-every",
    "6",
    "--init-sample-tokens",
    "256",
    "--eval-tokens",
    "256",
    "--seed",
    "3",
    "--no-progress",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs_ws(minilm_ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared harvest with a 2-process run ("multi") and a 1-process one ("single")."""
    ws = tmp_path_factory.mktemp("multihost") / "ws.duckdb"
    shutil.copy(minilm_ws, ws)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                *SAEWB,
                "train",
                "--workspace",
                str(ws),
                *TRAIN,
                "--name",
                "multi",
                "--mesh-data",
                "2",
                "--mesh-model",
                "2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(pid),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    single_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs.append(
        subprocess.Popen(
            [*SAEWB, "train", "--workspace", str(ws), *TRAIN, "--name", "single"],
            env=single_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0:
            for p in procs:
                p.kill()
            raise AssertionError(f"process {i} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-5000:]}")
    print(f"3 training processes: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before:.1f} s CPU")
    return ws


def test_two_processes_match_one(runs_ws: Path) -> None:
    from safetensors.numpy import load_file

    from sae import runs
    from saewb.workspace import Workspace

    ws = Workspace(runs_ws)
    multi, single = runs.run_metrics(ws, "multi"), runs.run_metrics(ws, "single")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [4, 8, 12]  # process 0 alone logged
    for key in ("loss", "fvu", "l0", "dead_frac"):
        np.testing.assert_allclose(
            [r[key] for r in multi], [r[key] for r in single], rtol=2e-5, atol=1e-6, err_msg=key
        )
    info = {r["name"]: r for r in runs.list_runs(ws)}
    assert info["multi"]["status"] == info["single"]["status"] == "done"
    assert info["multi"]["final_metrics"]["fvu"] == pytest.approx(
        info["single"]["final_metrics"]["fvu"], rel=1e-4
    )
    a = load_file(str(ws.runs_dir / "multi" / "sae" / "params.safetensors"))
    b = load_file(str(ws.runs_dir / "single" / "sae" / "params.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=2e-5, err_msg=name)
    # the checkpoint (written by process 0) records the mesh it came from
    latest = (ws.runs_dir / "multi" / "checkpoints" / "LATEST").read_text().strip()
    manifest = (ws.runs_dir / "multi" / "checkpoints" / latest / "manifest.json").read_text()
    assert '"data": 2' in manifest and '"model": 2' in manifest


def test_stream_rows_split_each_batch(minilm_ws: Path) -> None:
    from activations.stream import ActivationStream

    s = ActivationStream(minilm_ws, HOOK, batch_size=BATCH, seed=3, chunk_tokens=512, buffer_tokens=1024)
    full = [b for _, b in zip(range(3), s.batches(start=2), strict=False)]
    halves = [
        [b for _, b in zip(range(3), s.batches(start=2, rows=slice(lo, lo + BATCH // 2)), strict=False)]
        for lo in (0, BATCH // 2)
    ]
    for i, batch in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([halves[0][i], halves[1][i]]), batch)
        assert halves[0][i].shape == (BATCH // 2, s.d)


def test_distributed_settings_need_all_three(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae import distributed

    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert distributed.settings() is None
    with pytest.raises(ValueError, match="--num-processes and --process-id"):
        distributed.settings("127.0.0.1:1234")
    with pytest.raises(ValueError, match="need --coordinator"):
        distributed.settings(num_processes=2, process_id=1)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:8476")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.settings() == ("10.0.0.1:8476", 4, 3)
    assert distributed.settings(process_id=1) == ("10.0.0.1:8476", 4, 1)  # a flag beats the environment
