"""The notebook API (`import saewb`): the whole pipeline through it alone on a small tiny-lm cache,
results as objects, and bad arguments raising the line the CLI prints for the same input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LM_HOOK as HOOK

import saewb
from saewb.api import array_batches
from saewb.cli import main

RUN = "lm"
N_LATENTS, K = 256, 16


def test_pipeline_through_the_api(tiny_lm_api: dict) -> None:
    """harvest → train → analyze ran through the API in the shared `tiny_lm_api` fixture (conftest.py);
    here their results, then evaluate → load → encode."""
    import test_eval_support as support

    ws, harvest, run = tiny_lm_api["workspace"], tiny_lm_api["harvest"], tiny_lm_api["run"]
    assert harvest.n_tokens >= 12_000 and list(harvest.hooks) == [HOOK]
    assert "tiny-lm" in repr(harvest)

    assert run.status == "done" and run.arch == "topk" and run.hook == HOOK
    assert run.sae_config == saewb.TopKConfig(n_latents=N_LATENTS, k=K)
    assert run.train_config.train_tokens == 40_000
    assert np.isfinite(run.metrics["fvu"]) and run.metrics["l0"] <= K
    assert {"step", "tokens", "fvu", "l0"} <= set(run.curves.columns) and len(run.curves) >= 2
    assert repr(run).startswith(f"Run('{RUN}', topk on {HOOK}, done: fvu=")
    assert run._repr_html_().count("<svg") == 3  # fvu, l0, dead_frac against tokens

    evaluation = saewb.evaluate(
        ws, RUN, max_seqs=4, batch_size=4, model=support.model("tiny-lm"), progress=False
    )
    assert evaluation["model_kind"] == "causal_lm" and np.isfinite(evaluation["ce_score"])
    assert "ce_score" in set(evaluation.frame.metric) and "ce_score" in repr(evaluation)
    assert evaluation.metrics in [e.metrics for e in run.evaluations()]  # stored as `saewb eval` stores it

    analysis = tiny_lm_api["analysis"]
    assert len(analysis.latents) == N_LATENTS and analysis.summary["n_latents"] == N_LATENTS
    busiest = int(analysis.latents.sort_values("n_fires").latent.iloc[-1])
    latent = analysis.latent(busiest, window=3, limit=2)
    assert latent.stats["n_fires"] > 0 and len(latent.contexts) == 2
    from analysis.render import contexts_html

    page = latent._repr_html_()  # the app's highlighting, not a copy
    assert contexts_html(latent.contexts, float(latent.stats["max_act"])) in page and 'class="tok"' in page
    assert f"latent {busiest} of {RUN!r}" in repr(latent)

    steered = saewb.intervene(ws, RUN, "def f(x):", steer={busiest: 8.0}, model=support.model("tiny-lm"))
    assert steered.result.max_abs_logit_diff > 0 and len(steered.frame) == len(steered.result.logit_diff)
    assert repr(steered).startswith("next-token top-k:") and "max |Δlogit|" in repr(steered)

    loaded = saewb.load(ws)  # the newest finished run
    assert loaded.name == RUN and loaded.metrics == run.metrics and loaded.analysis().run == RUN
    x = harvest.activations(split="eval", max_rows=256)
    assert x.shape == (256, harvest.hooks[HOOK])
    f = loaded.encode(x)
    assert f.shape == (256, N_LATENTS) and ((f > 0).sum(1) <= K).all()
    x_hat = loaded.decode(f)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.5  # the trained SAE explains most of the held-out variance


def _cli_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """What `saewb` prints for ``argv``: its one-line error, without the `saewb CMD: error: ` prefix."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    return re.sub(r"^saewb [\w-]+: error: ", "", err)


def test_bad_arguments_raise_the_cli_line(tiny_lm_ws: Path, tmp_path: Path, capsys) -> None:
    ws = str(tiny_lm_ws)
    cases = [
        (
            lambda: saewb.train(ws, saewb.TopKConfig(n_latents=8, k=16), hook=HOOK, name="bad"),
            [
                "train",
                "--workspace",
                ws,
                "--hook",
                HOOK,
                "--arch",
                "topk",
                "--n-latents",
                "8",
                "--k",
                "16",
                "--name",
                "bad",
            ],
        ),
        (
            lambda: saewb.train(ws, arch="topk", hook="blocks.9.hook_out", name="bad", n_latents=8, k=2),
            ["train", "--workspace", ws, "--hook", "blocks.9.hook_out", "--arch", "topk", "--name", "bad"],
        ),
        (
            lambda: saewb.train(ws, saewb.TopKConfig(), hook=HOOK),
            ["train", "--workspace", ws, "--hook", HOOK, "--arch", "topk"],
        ),
        (
            lambda: saewb.evaluate(ws, RUN, max_seqs=1),
            ["eval", RUN, "--workspace", ws, "--max-seqs", "1"],
        ),
        (lambda: saewb.analyze(ws, "nope"), ["analyze", "nope", "--workspace", ws]),
        (lambda: saewb.explain(ws, RUN, limit=0), ["explain", RUN, "--workspace", ws, "--limit", "0"]),
        (
            lambda: saewb.intervene(ws, RUN, "def f(x):", ablate=[N_LATENTS + 5]),
            ["intervene", RUN, "--workspace", ws, "--prompt", "def f(x):", "--ablate", str(N_LATENTS + 5)],
        ),
    ]
    for call, argv in cases:
        with pytest.raises(saewb.UsageError) as caught:
            call()
        assert str(caught.value) == _cli_line(capsys, argv), argv
        assert isinstance(caught.value, ValueError) and caught.value.__cause__ is not None

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        f"workspace: {ws}\nname: sw\nhook: {HOOK}\narch: topk\n"
        "train: {train_tokens: 1024, batch_size: 256}\ndefaults: {n_latents: 8, k: 16}\n"
    )
    with pytest.raises(saewb.UsageError) as caught:
        saewb.sweep(
            ws,
            name="sw",
            hook=HOOK,
            arch="topk",
            train=saewb.TrainConfig(train_tokens=1024, batch_size=256),
            defaults={"n_latents": 8, "k": 16},
            dry_run=True,
        )
    assert str(caught.value) == _cli_line(capsys, ["sweep", str(sweep_file), "--dry-run"])

    planned = saewb.sweep(
        ws,
        name="sw",
        hook=HOOK,
        arch="topk",
        train={"train_tokens": 1024, "batch_size": 256},
        defaults={"n_latents": 8},
        grid={"k": [2, 4]},
        dry_run=True,
    )
    assert planned.members == ["sw-k2", "sw-k4"] and planned.runs == {}

    missing = str(tmp_path / "missing.duckdb")
    with pytest.raises(saewb.UsageError) as caught:
        saewb.load(missing, RUN)
    assert isinstance(caught.value, FileNotFoundError) and "does not exist" in str(caught.value)
    with pytest.raises(saewb.UsageError, match=r"unknown AnalyzeConfig option\(s\) \['top_m'\]"):
        saewb.analyze(ws, RUN, top_m=3)


def test_explain_through_the_api(explained_ws: Path, smollm2_chat: object, tmp_path: Path) -> None:
    """`saewb.explain` on the suite's explained workspace (two latents explained by the real SmolLM2 with
    these settings): the same selection resumes, a second call asks nothing, and the stored results come back."""
    import shutil

    from conftest import EXPLAIN_TEST_CONFIG

    ws = tmp_path / "ws.duckdb"
    shutil.copy(explained_ws, ws)
    config = saewb.ExplainConfig(**EXPLAIN_TEST_CONFIG)
    first = saewb.explain(ws, "demo", config, sample=2, backend=smollm2_chat, progress=False)
    # a latent the fixture left with a recorded failure (a malformed answer) is asked again; the rest resume
    assert first.result["selected"] == 2 and first.result["skipped_done"] + first.result["explained"] == 2
    out = saewb.explain(ws, "demo", config, sample=2, backend=smollm2_chat, progress=False)
    assert (
        out.result["selected"] == 2 and out.result["prompts_sent"] == 0
    )  # stored or answered from the cache
    assert len(out.texts) == 2 and all(out.texts.values())
    assert {"detection", "fuzzing", "embedding"} == set(out.summary.scorer) and "llm - baseline" in repr(out)


def test_fit_on_an_in_memory_array_resumes_and_refuses_bad_data(tmp_path: Path) -> None:
    """`saewb.fit`: no workspace; an array is shuffled into batches per epoch; the same call with
    ``run_dir`` resumes from its checkpoint to the same parameters as an uninterrupted run."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((48, 32)).astype(np.float32)
    x = ((rng.random((2048, 48)) < 0.06) * rng.random((2048, 48))) @ atoms
    sae_cfg = saewb.TopKConfig(n_latents=64, k=4)
    opts = {"batch_size": 128, "seed": 0, "log_every": 4, "init_sample_tokens": 512, "progress": False}

    full = saewb.fit(x, sae_cfg, train_tokens=128 * 24, **opts)
    assert {"tokens", "fvu"} <= set(full.curves.columns) and "<svg" in full._repr_html_()
    assert full.curves.fvu.iloc[-1] < full.curves.fvu.iloc[0] and np.isfinite(full.metrics["fvu"])
    assert full.sae.encode(x[:5]).shape == (5, 64)

    run_dir = tmp_path / "run"
    shuffled = array_batches(x, 128, 0)  # what fit makes of the array

    def dies_after_14(start: int):
        for i, batch in enumerate(shuffled(start)):
            if start + i == 14:
                raise RuntimeError("interrupted")
            yield batch

    with pytest.raises(RuntimeError, match="interrupted"):
        saewb.fit(dies_after_14, sae_cfg, train_tokens=128 * 24, ckpt_every=12, run_dir=run_dir, **opts)
    resumed = saewb.fit(x, sae_cfg, train_tokens=128 * 24, ckpt_every=12, run_dir=run_dir, **opts)
    assert resumed.result.history[0]["step"] > 12  # it resumed from the step-12 checkpoint
    np.testing.assert_allclose(np.asarray(resumed.params.W_dec), np.asarray(full.params.W_dec), atol=1e-6)

    with pytest.raises(saewb.UsageError, match=r"must be a float array \[rows, d\]"):
        saewb.fit(np.arange(10), sae_cfg, **opts)
    with pytest.raises(saewb.UsageError, match="fewer than batch_size 128"):
        saewb.fit(x[:100], sae_cfg, **opts)
    with pytest.raises(saewb.UsageError, match="unknown TrainConfig option"):
        saewb.fit(x, sae_cfg, n_latnets=3)
