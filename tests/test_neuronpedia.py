"""`saewb export-neuronpedia` on the demo workspace: one JSON file per latent, equal to the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saewb.cli import main


def test_export_neuronpedia(demo_ws: Path, tmp_path: Path) -> None:
    from analysis import neuronpedia, tables

    out = tmp_path / "np"
    stats = tables.latent_summary(demo_ws, "demo")
    alive = [s["latent"] for s in stats if s["n_fires"] > 0]
    dead = [s["latent"] for s in stats if s["n_fires"] == 0]
    pick = [alive[0], alive[-1], *dead[:1]]
    args = [
        "export-neuronpedia",
        "demo",
        str(out),
        "--workspace",
        str(demo_ws),
        "--latents",
        ",".join(map(str, pick)),
        "--n-top",
        "5",
    ]
    assert main(args) == 0  # the real CLI, in-process
    run = json.loads((out / "run.json").read_text())
    assert run["n_latents"] == 512 and run["layer"] == "blocks.2.hook_out" and run["modelId"] == "minilm"
    assert sorted(int(p.stem) for p in (out / "features").glob("*.json")) == sorted(pick)

    for latent in pick:
        rec = json.loads((out / "features" / f"{latent}.json").read_text())
        dash = tables.dashboard(demo_ws, "demo", latent, n_top=5)
        s = dash["summary"]
        assert rec["format"] == neuronpedia.FORMAT and rec["index"] == latent
        assert rec["frac_nonzero"] == pytest.approx(s["freq"]) and rec["n_fires"] == s["n_fires"]
        assert rec["freq_hist_data_bar_heights"] == list(s["hist"])
        assert len(rec["hist_edges"]) == len(s["hist"]) + 1
        assert [n["index"] for n in rec["neighbors"]] == [o for o, _ in dash["neighbors"]]
        tops = [a for a in rec["activations"] if a["kind"] == "top"]
        assert [a["tok_idx"] for a in tops] == [c.tok_idx for c in dash["top"]]
        if s["n_fires"]:
            assert tops and rec["log10_density"] < 0
            best = tops[0]
            assert best["values"][best["maxValueTokenIndex"]] == pytest.approx(best["maxValue"], rel=1e-5)
            assert best["maxValue"] == pytest.approx(s["max_act"], rel=1e-5)
            assert len(best["tokens"]) == len(best["values"]) <= 2 * 8 + 1
            assert any(a["kind"] == "band" and a["bin_min"] is not None for a in rec["activations"])
        else:
            assert tops == [] and rec["log10_density"] is None

    with pytest.raises(ValueError, match="out of range"):
        neuronpedia.export_neuronpedia(demo_ws, "demo", tmp_path / "bad", latents="100000")
    with pytest.raises(tables.AnalysisError, match="has not been analysed"):
        neuronpedia.export_neuronpedia(demo_ws, "nope", tmp_path / "bad")
