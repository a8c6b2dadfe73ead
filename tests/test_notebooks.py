"""Every notebook is executed (not just parsed) on small data, in a real Jupyter kernel."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ has no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm_ws: Path
) -> None:
    monkeypatch.setenv("SAEWB_WS", str(tmp_path / "ws.duckdb"))
    monkeypatch.setenv("SAEWB_MINILM_WS", str(minilm_ws))  # read-only shared harvest (notebook 03)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env={**os.environ})
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    if path.name == "01_quickstart.ipynb":  # the API's jobs draw tqdm.auto bars in a kernel, not log lines
        streams = "".join(
            o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"
        )
        assert re.search(r"train topk: +\d+%\|", streams) and "train topk: done" not in streams
