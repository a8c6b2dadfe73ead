"""`--corpus hf:NAME[:CONFIG[:SPLIT]]`: local dataset folders load; an uncached hub name fails fast and clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from activations.corpus import CorpusError, CorpusSpec, iter_documents, parse_hf


def test_parse_hf() -> None:
    assert parse_hf("hf:stas/openwebtext-10k") == ("stas/openwebtext-10k", None, "train")
    assert parse_hf("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hf("hf:name::validation") == ("name", None, "validation")
    with pytest.raises(CorpusError, match="hf:NAME"):
        parse_hf("hf:")


def test_local_dataset_folders(tmp_path: Path) -> None:
    import datasets

    rows = [{"body": f"document number {i} about files", "id": i} for i in range(5)]
    data = tmp_path / "files"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = list(iter_documents(CorpusSpec(f"hf:{data}", text_column="body")))
    assert [d.text for d in docs] == [r["body"] for r in rows]
    with pytest.raises(CorpusError, match="no column 'text'.*--text-column"):
        list(iter_documents(CorpusSpec(f"hf:{data}")))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert [d.text for d in iter_documents(CorpusSpec(f"hf:{saved}", text_column="body"))] == [
        r["body"] for r in rows
    ]


def test_uncached_hub_dataset_fails_fast_with_the_fix(tmp_path: Path) -> None:
    """A fresh process (the offline switch is process-wide), an empty cache, the hub unreachable here."""
    from activations.models import hub_reachable

    code = (
        "from activations.corpus import CorpusSpec, iter_documents\n"
        "next(iter_documents(CorpusSpec('hf:saewb-test/surely-not-cached')))"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    # offline by the user's choice, then by detection (the hub is unreachable on this machine)
    for env, offline in (({"HF_HUB_OFFLINE": "1"}, True), ({}, not hub_reachable())):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=180,
            env={**base, **env, "HF_HOME": str(tmp_path / "hf")},
        )
        assert proc.returncode != 0
        if offline:
            assert "not in the local Hugging Face cache and the hub is unreachable" in proc.stderr
            assert "save_to_disk" in proc.stderr
            assert time.perf_counter() - start < 30, "offline failure must not wait on network retries"
        else:  # online (CI with internet): the hub answers that the dataset does not exist
            assert "could not load dataset 'saewb-test/surely-not-cached'" in proc.stderr
