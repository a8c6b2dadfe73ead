"""Neuronpedia-style export: one JSON file per latent with everything its dashboard shows.

    saewb export-neuronpedia RUN OUT_DIR --workspace ws.duckdb [--latents 0,5,9] [--n-top 20] [--window 8]

Layout of ``OUT_DIR``::

    run.json              # the run: model, hook, harvest, arch, d, n_latents, analysed tokens, format
    features/<latent>.json

Each feature file (format ``saewb-neuronpedia/1``; field names follow Neuronpedia's feature JSON where
it has one: ``activations``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values``, ``frac_nonzero``,
``freq_hist_data_bar_heights``/``freq_hist_data_bar_values``; the rest are ours)::

    {
      "format": "saewb-neuronpedia/1",
      "modelId": "minilm", "layer": "blocks.2.hook_out", "run": "demo", "index": 7,
      "frac_nonzero": 0.012,            # density: fires / analysed (non-special) tokens
      "log10_density": -1.92,           # null when the latent never fires
      "n_fires": 96, "mean_act": 1.3, "max_act": 4.1,
      "activations": [                  # top contexts, highest first, then quantile-band samples
        {"kind": "top", "band": -1, "rank": 0, "tok_idx": 1234, "doc_id": 17,
         "tokens": ["def", " open", ...], "values": [0.0, 4.1, ...],
         "maxValue": 4.1, "maxValueTokenIndex": 1, "bin_min": null, "bin_max": null},
        {"kind": "band", "band": 4, "rank": 0, ..., "bin_min": 3.2, "bin_max": 4.1}, ...
      ],
      "quantiles": [{"band": 0, "lo": 0.01, "hi": 0.4}, ...],   # activation range of each band
      "freq_hist_data_bar_heights": [int, ...],   # histogram of positive activations: counts
      "freq_hist_data_bar_values": [float, ...],  # ... and the centre of each bin
      "hist_edges": [float, ...],                 # n_bins + 1 edges over [0, max_act]
      "pos_str": ["Ġfile", ...], "pos_values": [0.31, ...],   # logit effect (causal LMs; [] otherwise)
      "neg_str": [...], "neg_values": [...],
      "neighbors": [{"index": 12, "cosine": 0.61}, ...],       # nearest decoder directions
      "cooccurring": [{"index": 3, "count": 40, "norm": 0.42}, ...],
      "family": [{"latent": 7, "parent": null, "depth": 0, "weight": null, "family": 2}, ...]
    }

``tokens``/``values`` cover ``window`` tokens either side of the activating token, inside its sequence;
``values`` are the latent's activations on those tokens (0 where it does not fire or on special tokens).
Everything comes from the tables `saewb analyze` stores (analysis/tables.py); nothing is recomputed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from analysis import tables
from saewb.workspace import Workspace, existing_workspace

FORMAT = "saewb-neuronpedia/1"
_LATENTS_PER_READ = 64
"""Latents read per short connection: the export never holds the workspace for long."""


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) or math.isinf(f) else f


def _context(c: tables.Context, bands: dict[int, tuple[float, float]]) -> dict[str, Any]:
    lo, hi = bands.get(c.band, (None, None))
    return {
        "kind": c.kind,
        "band": c.band,
        "rank": c.rank,
        "tok_idx": c.tok_idx,
        "doc_id": c.doc_id,
        "tokens": list(c.tokens),
        "values": [float(a) for a in c.acts],
        "maxValue": float(c.value),
        "maxValueTokenIndex": c.center,
        "bin_min": _num(lo) if c.kind == "band" else None,
        "bin_max": _num(hi) if c.kind == "band" else None,
    }


def feature_record(
    dash: dict[str, Any], run: str, latent: int, model: str | None, hook: str | None
) -> dict[str, Any]:
    """The JSON record of one latent from `tables.dashboard`'s dict."""
    s = dash["summary"]
    hist = [int(h) for h in (s.get("hist") or [])]
    edges = tables.hist_edges(s.get("max_act") or 0.0, len(hist)) if hist else np.zeros(0)
    freq = _num(s.get("freq")) or 0.0
    bands = {int(b): (lo, hi) for b, lo, hi in dash["band_ranges"]}

    def listed(key: str) -> list[Any]:
        v = s.get(key)
        return [] if v is None else list(v)

    return {
        "format": FORMAT,
        "modelId": model,
        "layer": hook,
        "run": run,
        "index": int(latent),
        "frac_nonzero": freq,
        "log10_density": math.log10(freq) if freq > 0 else None,
        "n_fires": int(s.get("n_fires") or 0),
        "mean_act": _num(s.get("mean_act")),
        "max_act": _num(s.get("max_act")),
        "activations": [_context(c, bands) for c in [*dash["top"], *dash["bands"]]],
        "quantiles": [{"band": b, "lo": _num(lo), "hi": _num(hi)} for b, (lo, hi) in sorted(bands.items())],
        "freq_hist_data_bar_heights": hist,
        "freq_hist_data_bar_values": [float(v) for v in (edges[:-1] + edges[1:]) / 2] if hist else [],
        "hist_edges": [float(v) for v in edges],
        "pos_str": listed("logit_pos_tokens"),
        "pos_values": [float(v) for v in listed("logit_pos")],
        "neg_str": listed("logit_neg_tokens"),
        "neg_values": [float(v) for v in listed("logit_neg")],
        "neighbors": [{"index": o, "cosine": c} for o, c in dash["neighbors"]],
        "cooccurring": [{"index": o, "count": n, "norm": r} for o, n, r in dash["cooccurring"]],
        "family": [{**m, "weight": _num(m.get("weight"))} for m in dash["family"]],
    }


def _dashboards(
    ws: Workspace, run: str, latents: list[int], n_top: int, window: int
) -> Iterable[tuple[int, dict]]:
    """`tables.dashboard` for many latents, a bounded number per short read connection."""
    for start in range(0, len(latents), _LATENTS_PER_READ):
        with ws.read() as con:
            info = tables.require_analysis(ws, run, con)
            for latent in latents[start : start + _LATENTS_PER_READ]:
                yield latent, tables.latent_dashboard(ws, con, info, run, latent, n_top=n_top, window=window)


def parse_latents(text: str | None, n_latents: int) -> list[int]:
    """'0,5,9' or '0-99' (or a mix) → sorted latent ids; None → all."""
    if not text:
        return list(range(n_latents))
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"--latents: cannot read {part!r}; use ids and ranges like 0,5,10-20") from None
    bad = sorted(i for i in out if not 0 <= i < n_latents)
    if bad:
        raise ValueError(f"--latents: {bad[:5]} out of range; the run has latents 0..{n_latents - 1}")
    return sorted(out)


def export_neuronpedia(
    workspace: str | Path | Workspace,
    run: str,
    out_dir: str | Path,
    *,
    latents: str | list[int] | None = None,
    n_top: int = 20,
    window: int = 8,
) -> dict[str, Any]:
    """Write ``run.json`` and ``features/<latent>.json`` for an analysed run; returns the run record."""
    from sae import runs

    ws = existing_workspace(workspace)
    info = tables.analysis_info(ws, run)
    row = runs.get_run(ws, run) or {}
    model = None
    try:
        from activations.store import harvest_info

        h = harvest_info(ws, info["harvest"])
        model = h.config.get("identity", {}).get("model")
    except ValueError:
        pass
    ids = latents if isinstance(latents, list) else parse_latents(latents, int(info["n_latents"]))
    out = Path(out_dir)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    for latent, dash in _dashboards(ws, run, ids, n_top, window):
        rec = feature_record(dash, run, latent, model, info["hook"])
        (feat_dir / f"{latent}.json").write_text(json.dumps(rec, ensure_ascii=False))
    record = {
        "format": FORMAT,
        "run": run,
        "modelId": model,
        "layer": info["hook"],
        "harvest": info["harvest"],
        "arch": row.get("arch"),
        "n_latents": int(info["n_latents"]),
        "analysed_tokens": int(info["n_tokens"]),
        "exported_latents": len(ids),
        "final_metrics": row.get("final_metrics") or {},
        "features_dir": "features",
        "n_top": n_top,
        "window": window,
    }
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str))
    return record
