"""k-sparse probing (Gurnee et al. 2023; SAEBench) on SAE latents next to raw model dimensions.

Each text is run through the model; its feature vector is the mean over its non-special tokens of
either the SAE latents or the raw activation at the SAE's hook. On the training split, features are
ranked by |mean(pos) − mean(neg)|; an L2-regularised logistic regression (Newton's method, numpy)
is fitted on the top k, standardised with training statistics, and scored on the test split.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activations.corpus import Document
from activations.tokenize import WindowTokenizer
from analysis.runs import RunContext
from analysis.splice import encode_rows, hooked

DEFAULT_KS = (1, 2, 5, 10, 20)


def load_labelled(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, 0/1 labels and the two class names from a CSV (header with text,label) or JSONL file.

    Labels may be any two distinct values; the one sorting last is the positive class.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labelled data {path} does not exist")
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err}); one object per line") from err
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise ValueError(
                    f'{path}:{n} needs "text" and "label" keys, e.g. {{"text": "...", "label": 1}}'
                )
            rows.append((str(obj["text"]), str(obj["label"])))
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path} needs a header row with columns text,label; found {reader.fieldnames}"
                )
            rows = [(r["text"], r["label"]) for r in reader]
    else:
        raise ValueError(f"{path}: use a .csv (header text,label) or .jsonl ({{text, label}} per line) file")
    classes = sorted({label for _, label in rows})
    if len(classes) != 2:
        raise ValueError(
            f"{path} has {len(classes)} label values {classes[:10]}; binary probing needs exactly 2"
        )
    texts = [t for t, _ in rows]
    y = np.array([classes.index(label) for _, label in rows], dtype=np.int64)
    return texts, y, classes


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2 logistic regression by Newton's method: minimises Σ log-loss + l2/2 ‖w‖² (bias unpenalised)."""
    n, k = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(k + 1)
    reg = np.full(k + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -50, 50)))
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(k + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w[:-1], float(w[-1])


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    acc = float(np.mean(pred == y))
    tp = float(np.sum((pred == 1) & (y == 1)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    return acc, f1


def sparse_probe(
    feats: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    ks: tuple[int, ...] = DEFAULT_KS,
    l2: float = 1.0,
) -> list[dict[str, float]]:
    """Test accuracy/F1 of a logistic probe on the top-k features (ranked on the training split) per k."""
    xtr, ytr = feats[train], y[train]
    gap = np.abs(xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0))
    order = np.argsort(-gap, kind="stable")
    out = []
    for k in ks:
        cols = order[: min(k, feats.shape[1])]
        mu, sd = xtr[:, cols].mean(0), xtr[:, cols].std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)
        w, b = fit_logistic((xtr[:, cols] - mu) / sd, ytr, l2=l2)
        pred = ((((feats[test][:, cols] - mu) / sd) @ w + b) > 0).astype(np.int64)
        acc, f1 = _scores(y[test], pred)
        out.append({"k": int(k), "accuracy": acc, "f1": f1, "features": [int(c) for c in cols]})
    return out


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified train/test split with at least one example of each class on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("--test-fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} example(s); give at least 2 per class (better: 20+)")
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def text_features(
    model: Any, ctx: RunContext, texts: list[str], batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per text: mean raw activation [d] and mean SAE latents [n_latents] over its non-special tokens."""
    import torch

    from activations.models import plan_hooks

    splitter = WindowTokenizer(model.tokenizer, ctx.ctx_len)
    stop = plan_hooks(model, [ctx.hook]).stop_at_layer
    raw_out, lat_out = [], []
    for start in range(0, len(texts), batch_size):
        wins = []
        for i, text in enumerate(texts[start : start + batch_size]):
            # The first window of each text, wrapped exactly as in the harvest (long texts are cut).
            wins.append(next(splitter.windows(start + i, Document(text=text, source="probe"))))
        width = max(len(w.token_ids) for w in wins)
        ids = np.full((len(wins), width), splitter.pad_id, dtype=np.int64)
        att = np.zeros_like(ids)
        keep = np.zeros(ids.shape, dtype=bool)
        for r, w in enumerate(wins):
            ids[r, : len(w.token_ids)] = w.token_ids
            att[r, : len(w.token_ids)] = 1
            keep[r, : len(w.token_ids)] = ~w.special
        store: list[torch.Tensor] = []
        with hooked(model, [(ctx.hook, _capture_into(store))]):
            try:
                model(torch.from_numpy(ids), attention_mask=torch.from_numpy(att), stop_at_layer=stop)
            except Exception as err:  # the bridge signals an early stop with an exception
                if type(err).__name__ != "StopAtLayerException":
                    raise
        acts = store[-1].float().numpy()
        for r in range(len(wins)):
            x = acts[r][keep[r]]
            if len(x) == 0:
                x = acts[r][att[r] == 1]  # a text of only special tokens: fall back to all tokens
            f = encode_rows(ctx.sae, x)
            raw_out.append(x.astype(np.float64).mean(0))
            lat_out.append(f.astype(np.float64).mean(0))
    return np.stack(raw_out), np.stack(lat_out)


def _capture_into(store: list[Any]) -> Any:
    def capture(act: Any, hook: Any = None) -> Any:
        store.append(act.detach())
        return act

    return capture


@dataclass
class ProbeReport:
    rows: list[dict[str, Any]]
    """Per k: sae_accuracy, sae_f1, raw_accuracy, raw_f1."""
    n_train: int
    n_test: int
    classes: list[str]


def probe_run(
    model: Any,
    ctx: RunContext,
    texts: list[str],
    y: np.ndarray,
    classes: list[str],
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1.0,
) -> ProbeReport:
    if any(k < 1 for k in ks):
        raise ValueError("every k must be at least 1")
    train, test = split_indices(y, test_fraction, seed)
    raw, lat = text_features(model, ctx, texts)
    sae_rows = sparse_probe(lat, y, train, test, ks, l2)
    raw_rows = sparse_probe(raw, y, train, test, ks, l2)
    rows = [
        {
            "k": s["k"],
            "sae_accuracy": s["accuracy"],
            "sae_f1": s["f1"],
            "raw_accuracy": r["accuracy"],
            "raw_f1": r["f1"],
            "sae_latents": s["features"],
        }
        for s, r in zip(sae_rows, raw_rows, strict=True)
    ]
    return ProbeReport(rows, len(train), len(test), classes)


def format_probe(rep: ProbeReport) -> str:
    lines = [
        f"sparse probing: {rep.n_train} train / {rep.n_test} test texts, positive class {rep.classes[1]!r}",
        f"  {'k':>3} {'sae_acc':>8} {'sae_f1':>8} {'raw_acc':>8} {'raw_f1':>8}  top SAE latents",
    ]
    for r in rep.rows:
        lines.append(
            f"  {r['k']:>3} {r['sae_accuracy']:8.3f} {r['sae_f1']:8.3f} {r['raw_accuracy']:8.3f} "
            f"{r['raw_f1']:8.3f}  {r['sae_latents'][:5]}"
        )
    return "\n".join(lines)
