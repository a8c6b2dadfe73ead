"""`saewb sweep`: lockstep training against one-by-one training, exact resume, refusal of bad files.

The workspace holds synthetic activations (low rank plus noise) written through the real store
functions into a real DuckDB file, so these tests need no model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from activations.store import activation_table, ensure_schema, fixed_size_list, insert_arrow, quote_ident
from activations.stream import ActivationStream
from saewb.cli import main as saewb
from saewb.workspace import Workspace

HOOKS = {"blocks.0.hook_out": 12, "blocks.1.hook_out": 16}
N_TOKENS = 4000


def _synthetic_workspace(path: Path) -> Path:
    rng = np.random.default_rng(0)
    ws = Workspace(path)
    doc_id = np.arange(N_TOKENS) // 40
    with ws.write() as con:
        ensure_schema(con)
        config = {"identity": {"model": "synthetic", "hooks": list(HOOKS), "ctx_len": 40}}
        con.execute(
            "INSERT INTO harvests (name, config, model, ctx_len, status, n_windows, n_tokens, n_docs) "
            "VALUES ('default', ?, 'synthetic', 40, 'complete', ?, ?, ?)",
            [json.dumps(config), N_TOKENS // 40, N_TOKENS, N_TOKENS // 40],
        )
        tokens = pa.table(
            {
                "harvest": ["default"] * N_TOKENS,
                "tok_idx": np.arange(N_TOKENS),
                "doc_id": doc_id,
                "pos": (np.arange(N_TOKENS) % 40).astype(np.int32),
                "seq_id": doc_id,
                "seq_pos": (np.arange(N_TOKENS) % 40).astype(np.int32),
                "token_id": rng.integers(0, 100, N_TOKENS).astype(np.int32),
                "token_str": ["t"] * N_TOKENS,
                "is_special": np.arange(N_TOKENS) % 40 == 0,
                "role": pa.nulls(N_TOKENS, pa.string()),
            }
        )
        insert_arrow(con, "tokens", tokens)
        for hook, d in HOOKS.items():
            table = activation_table("default", hook)
            con.execute(f"CREATE TABLE {quote_ident(table)} (tok_idx BIGINT NOT NULL, x FLOAT[{d}])")
            con.execute("INSERT INTO harvest_hooks VALUES ('default', ?, ?, ?)", [hook, d, table])
            x = rng.normal(size=(N_TOKENS, 4)) @ rng.normal(size=(4, d)) + 0.1 * rng.normal(
                size=(N_TOKENS, d)
            )
            insert_arrow(
                con, table, pa.table({"tok_idx": np.arange(N_TOKENS), "x": fixed_size_list(x + 1.0)})
            )
    return path


@pytest.fixture(scope="module")
def ws_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic_workspace(tmp_path_factory.mktemp("sweep") / "template.duckdb")


@pytest.fixture
def ws(ws_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ws.duckdb"
    shutil.copy(ws_template, path)
    return path


def _sweep_file(tmp_path: Path, ws: Path, **over: object) -> Path:
    spec: dict = {
        "workspace": str(ws),
        "name": "sw",
        "hook": "blocks.1.hook_out",
        "eval_tokens": 256,
        "progress": False,
        "train": {
            "train_tokens": 64 * 24,
            "batch_size": 64,
            "seed": 3,
            "log_every": 4,
            "ckpt_every": 8,
            "init_sample_tokens": 512,
            "warmup_steps": 2,
        },
        "defaults": {"n_latents": 32},
        "members": [
            {"name": "a", "k": 4, "seed": 0},
            {"name": "b", "k": 4, "seed": 1},  # differs from a only by seed: vmapped with it
            {"name": "d", "k": 2, "seed": 1},  # and by k too: vmapped with them, its picks past 2 zeroed
            {"name": "c", "k": 6, "n_latents": 24, "hook": "blocks.0.hook_out"},  # another hook and shape
        ],
    }
    spec.update(over)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _params(tree: object) -> dict[str, np.ndarray]:
    from sae.checkpoint import flatten

    return flatten(tree)


@pytest.fixture(scope="module")
def swept(ws_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep run once, uninterrupted, through the CLI."""
    root = tmp_path_factory.mktemp("swept")
    path = root / "ws.duckdb"
    shutil.copy(ws_template, path)
    assert saewb(["sweep", str(_sweep_file(root, path))]) == 0
    return path


def test_sweep_equals_runs_trained_one_by_one(swept: Path, tmp_path: Path) -> None:
    import sae
    from sae import runs
    from sae.sweep import load_sweep, plan_sweep, step_groups
    from sae.trainer import train

    plan = plan_sweep(load_sweep(_sweep_file(tmp_path, swept)))
    groups = step_groups(plan.members, plan.widths)
    assert sorted(len(g.members) for g in groups) == [1, 3] and any(g.vmapped for g in groups)
    for m in plan.members:
        stream = ActivationStream(swept, m.hook, batch_size=64, seed=3)
        solo = train(m.sae_config, m.train_config, lambda s, st=stream: st.batches(start=s), progress=False)
        ref, mine = _params(solo.params), _params(sae.load(m.name, workspace=swept).params)
        assert ref.keys() == mine.keys()
        for key in ref:
            np.testing.assert_allclose(mine[key], ref[key], rtol=2e-4, atol=2e-5, err_msg=f"{m.name} {key}")
        row = runs.get_run(Workspace(swept), m.name)
        assert row["status"] == "done" and row["hook"] == m.hook and np.isfinite(row["final_metrics"]["fvu"])
        assert [r["step"] for r in runs.run_metrics(Workspace(swept), m.name)] == list(range(4, 25, 4))
    # an ordinary run: `saewb eval` reads it
    assert saewb(["eval", "sw-c", "--workspace", str(swept), "--no-downstream"]) == 0


def test_interrupted_sweep_resumes_exactly(swept: Path, ws: Path, tmp_path: Path) -> None:
    import sae
    from sae import runs
    from sae.sweep import load_sweep, plan_sweep, run_sweep, train_lockstep

    path = _sweep_file(tmp_path, ws, eval_tokens=0)
    plan = plan_sweep(load_sweep(path))

    class Stop(Exception):
        pass

    def log_then_stop(name: str, row: dict) -> None:
        if row["step"] >= 20:
            raise Stop
        runs.log_metrics(Workspace(ws), name, [row])

    for m in plan.members:
        runs.start_run(
            Workspace(ws),
            m.name,
            harvest=plan.harvest,
            hook=m.hook,
            arch=m.sae_config.arch,
            config=plan.run_record(m),
            checkpoint_path="",
        )
    streams = {h: ActivationStream(ws, h, batch_size=64, seed=3) for h in HOOKS}
    with pytest.raises(Stop):
        train_lockstep(
            plan.members,
            {h: (lambda s, st=st: st.batches(start=s)) for h, st in streams.items()},
            run_dirs={m.name: Workspace(ws).runs_dir / m.name for m in plan.members},
            state_path=plan.state_path,
            state_record=plan.record,
            on_log=log_then_stop,
            progress=False,
        )
    assert json.loads(plan.state_path.read_text())["step"] == 16
    run_sweep(plan_sweep(load_sweep(path)))  # resumes at step 16
    for m in plan.members:
        a, b = (
            _params(sae.load(m.name, workspace=ws).params),
            _params(sae.load(m.name, workspace=swept).params),
        )
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{m.name} {key}")
        assert [r["step"] for r in runs.run_metrics(Workspace(ws), m.name)] == list(range(4, 25, 4))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown top-level key"),
        ({"members": [{"name": "a", "k": 64}]}, "k=64 must be between 1 and n_latents=32"),
        ({"hook": "blocks.9.hook_out"}, "is not in harvest"),
        ({"members": [{"name": "a"}, {"name": "a"}]}, "occur twice"),
        ({"members": [{"name": "a", "batch_size": 32}]}, "put them under train"),
        ({"members": [{"name": "a", "l1_coef": 2.0}]}, "do not apply"),
        ({"grid": {"k": 4}}, "non-empty list"),
        ({"train": {"batch_size": 64, "train_tokens": 10}}, "less than one batch"),
        ({"members": None, "grid": None}, "no members"),
        ({"workspace": "missing.duckdb"}, "does not exist"),
        ({"members": [{"name": "a", "arch": "itda"}]}, "cannot train in lockstep with a sweep"),
    ],
)
def test_bad_sweep_files_are_refused_before_work(
    ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    path = _sweep_file(tmp_path, ws, **change)
    assert saewb(["sweep", str(path)]) == 1
    assert message in capsys.readouterr().err
    assert not Workspace(ws).runs_dir.exists() and not Workspace(ws).table_exists("runs")


def test_malformed_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    assert saewb(["sweep", str(path)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_shared_geometric_medians_compute_once_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's members of one hook share their init sample: its median is computed once, and is the
    median computed alone."""
    from sae import common

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(300, 8)).astype(np.float32)
    alone = common.geometric_median(a)
    calls = []
    weiszfeld = common.weiszfeld
    monkeypatch.setattr(common, "weiszfeld", lambda *args: calls.append(1) or weiszfeld(*args))
    with common.shared_geometric_medians():
        got = [common.geometric_median(x) for x in (a, a.copy(), b, a)]
    assert len(calls) == 2  # a once (equal copies included), b once
    np.testing.assert_array_equal(got[0], alone)
    np.testing.assert_array_equal(got[3], alone)
    assert not np.array_equal(got[2], alone)
    common.geometric_median(a)  # outside the context nothing is kept
    assert len(calls) == 3


def test_topk_members_of_other_k_share_a_step_within_a_factor_of_two() -> None:
    from sae.sweep import Member, step_groups
    from sae.topk import TopKConfig
    from sae.trainer import TrainConfig

    tc = TrainConfig(train_tokens=4096, batch_size=64)
    ms = [Member(f"m{k}", "h", TopKConfig(n_latents=64, k=k), tc) for k in (8, 4, 16, 5, 40)]
    ms.append(Member("multi", "h", TopKConfig(n_latents=64, k=6, multi_topk=True), tc))  # 4k picks: alone
    groups = step_groups(ms, {"h": 12})
    got = sorted(sorted(ms[i].sae_config.k for i in g.members) for g in groups)
    assert got == [[4, 5, 8], [6], [16], [40]]
    for g in groups:
        ks = [ms[i].sae_config.k for i in g.members]
        assert g.trainer.cfg.k == max(ks)
        assert (g.k_active is None) == (len(set(ks)) == 1)
        if g.k_active is not None:
            assert list(np.asarray(g.k_active)) == ks
