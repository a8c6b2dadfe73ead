"""Sparse probing: the logistic regression solves its problem, features are ranked as specified,
and a clearly separable labelled set is probed end to end on MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_eval_support as support

from analysis.evaluate import list_evals
from analysis.probing import fit_logistic, load_labelled, probe_run, sparse_probe, split_indices

CODE = [
    "list",
    "dictionary",
    "tuple",
    "string",
    "integer",
    "iterator",
    "generator",
    "file handle",
    "socket",
    "thread",
    "module",
    "class",
    "exception",
    "decorator",
    "byte array",
    "queue",
    "set",
    "path",
    "regex",
    "buffer",
]
FOOD = [
    "soup",
    "bread",
    "pasta",
    "salad",
    "cake",
    "rice",
    "stew",
    "pancakes",
    "curry",
    "pie",
    "omelette",
    "noodles",
    "risotto",
    "tacos",
    "dumplings",
    "porridge",
    "lasagna",
    "muffins",
    "chowder",
    "sushi",
]


def test_logistic_regression_is_at_its_optimum() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x @ np.array([2.0, -1.0, 0.0, 0.5, 0.0]) + rng.normal(size=200) > 0).astype(float)
    l2 = 0.7
    w, b = fit_logistic(x, y, l2=l2)
    p = 1 / (1 + np.exp(-(x @ w + b)))
    # Stationarity of Σ log-loss + l2/2‖w‖²: the gradient vanishes (bias unpenalised).
    np.testing.assert_allclose(x.T @ (p - y) + l2 * w, 0.0, atol=1e-8)
    assert abs(np.sum(p - y)) < 1e-8
    assert w[0] > 1.0 and w[1] < -0.5


def test_sparse_probe_ranks_by_mean_difference() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    feats = rng.normal(size=(100, 30))
    feats[:, 7] += 3.0 * y  # the one informative feature
    feats[:, 2] += 1e3  # large but uninformative: must not win on magnitude
    train, test = split_indices(y, 0.3, seed=0)
    rows = sparse_probe(feats, y, train, test, ks=(1, 5))
    assert rows[0]["features"] == [7]
    assert rows[0]["accuracy"] > 0.85 and rows[0]["f1"] > 0.85
    assert len(rows[1]["features"]) == 5
    assert set(train).isdisjoint(test) and len(train) + len(test) == 100


def test_load_labelled_formats_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "d.csv"
    good.write_text('text,label\n"a, b",pos\nc,neg\n')
    texts, y, classes = load_labelled(good)
    assert texts == ["a, b", "c"] and y.tolist() == [1, 0] and classes == ["neg", "pos"]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "x", "label": 0}\n\n{"text": "y", "label": 1}\n')
    assert load_labelled(jl)[1].tolist() == [0, 1]
    three = tmp_path / "three.csv"
    three.write_text("text,label\na,1\nb,2\nc,3\n")
    with pytest.raises(ValueError, match="exactly 2"):
        load_labelled(three)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("a,1\nb,0\n")
    with pytest.raises(ValueError, match="header row with columns text,label"):
        load_labelled(nohead)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match='needs "text" and "label"'):
        load_labelled(bad)
    txt = tmp_path / "d.txt"
    txt.write_text("a\n")
    with pytest.raises(ValueError, match="use a .csv"):
        load_labelled(txt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled(tmp_path / "missing.csv")


def _topics(path: Path) -> Path:
    lines = [{"text": f"The function returns a {w} from the argument.", "label": "code"} for w in CODE]
    lines += [{"text": f"The chef cooked {w} for the guests.", "label": "food"} for w in FOOD]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def test_probe_on_minilm(minilm_ws: Path, tmp_path: Path) -> None:
    ctx = support.minilm_context(str(minilm_ws))
    texts, y, classes = load_labelled(_topics(tmp_path / "topics.jsonl"))
    rep = probe_run(support.model("minilm"), ctx, texts, y, classes, ks=(1, 2, 5, 20), seed=0)
    assert [r["k"] for r in rep.rows] == [1, 2, 5, 20]
    assert (rep.n_train, rep.n_test) == (30, 10)
    assert rep.rows[-1]["raw_accuracy"] >= 0.9  # two obvious topics separate on MiniLM's raw dims
    assert all(0.0 <= r["sae_accuracy"] <= 1.0 and len(r["sae_latents"]) == r["k"] for r in rep.rows)


def test_probe_cli_stores_result(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_gpt2: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from saewb.cli import main

    ws = support.gpt2_workspace(str(tmp_path_factory.getbasetemp()), str(tiny_gpt2))
    data = _topics(tmp_path / "topics.jsonl")
    args = [
        "probe",
        "t",
        "--workspace",
        str(ws),
        "--model",
        str(tiny_gpt2),
        "--data",
        str(data),
        "--ks",
        "1,5",
    ]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["k"] for r in out["rows"]] == [1, 5] and out["classes"] == ["code", "food"]
    assert list_evals(ws, "t", "probe")[-1]["metrics"]["rows"] == out["rows"]
    assert main([*args, "--test-fraction", "1.5"]) == 1
    assert "--test-fraction must be between 0 and 1" in capsys.readouterr().err
