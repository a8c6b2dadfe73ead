"""`saewb train --wandb`: the workspace's metric rows mirrored to a real (offline) W&B run; a clear error without wandb."""

from __future__ import annotations

import glob
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from saewb.cli import main

TRAIN = [
    "--hook",
    "blocks.2.hook_out",
    "--arch",
    "topk",
    "--n-latents",
    "64",
    "--k",
    "4",
    "--train-tokens",
    "2048",
    "--batch-size",
    "256",
    "--log-every",
    "2",
    "--eval-tokens",
    "512",
    "--no-progress",
]


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline .wandb file (leveldb-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, rows, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                )
    return rows


def test_train_logs_the_same_rows_to_wandb(
    demo_ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae import runs
    from saewb.workspace import Workspace

    ws_path = tmp_path / "ws.duckdb"
    shutil.copy(demo_ws, ws_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert (
        main(
            ["train", "--workspace", str(ws_path), "--name", "wb", "--wandb", "--wandb-project", "t", *TRAIN]
        )
        == 0
    )
    rows = runs.run_metrics(Workspace(ws_path), "wb")
    assert len(rows) >= 4
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    logged = [r for r in _wandb_history(files[0]) if "fvu" in r]
    assert [r["_step"] for r in logged] == [r["step"] for r in rows]
    for ours, theirs in zip(rows, logged, strict=True):
        for key in ("loss", "fvu", "l0", "dead_frac", "lr", "tokens"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-6), key


def test_wandb_missing_is_a_clear_error(
    demo_ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    assert main(["train", "--workspace", str(demo_ws), "--name", "nowb", "--wandb", *TRAIN]) == 1
    err = capsys.readouterr().err
    assert "pip install wandb" in err
    from sae import runs
    from saewb.workspace import Workspace

    assert runs.get_run(Workspace(demo_ws), "nowb") is None  # refused before any work
