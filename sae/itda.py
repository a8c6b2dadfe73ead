"""ITDA: Inference-Time Decomposition of Activations (Leask, Nanda & Al Moubayed 2025).

The dictionary is made of real activations. Each is stored normalised, u = (x − b)/‖x − b‖, and
labelled with the harvest's ``tok_idx`` of the token it came from (``atom_tokens`` resolves labels to
(doc_id, pos, token)). Encoding is matching pursuit (MP) with k steps: pick the atom with the largest
|⟨r, a_j⟩|, add ⟨r, a_j⟩ (which may be negative) to its coefficient, subtract; an atom may be
picked twice, so L0 ≤ k. Decoding is f · atoms + b.

Fit (``fit``, not gradient based), over the same stream of batches as the trainer: for every batch,
each token's u is decomposed on the current dictionary and its relative MP loss ‖u − û‖² is
compared with ``tau``; the tokens above ``tau`` are added to the dictionary. Dedupe: a token whose
label is already an atom is never added again (a second epoch adds nothing twice), and within one
batch the candidates are accepted greedily in stream order, skipping one that a single already
accepted candidate of the same batch would reconstruct within ``tau`` (1 − cos² ≤ tau) [adapt: the
paper adds a batch's candidates at once; this keeps exact or near copies out]. The dictionary stops
growing at ``max_atoms``. Similarity of two ITDAs (other layer, model or seed): ``jaccard`` of
their label sets.

Adaptations [adapt]: ``center=True`` subtracts the mean of the first ``init_sample_tokens`` tokens
(b) before normalising and decomposing (the paper decomposes raw activations: ``center=False``, the
default, b = 0); MP runs in float32 with the atoms' Gram matrix when the dictionary has at most
``GRAM_MAX_ATOMS`` atoms (correlation update c ← c − α·G[j], O(B·n) per step) and recomputes
r·Aᵀ otherwise (also when n ≥ k·B, e.g. a few tokens at a time, where that is cheaper). Labels
are int32 (harvests up to 2^31 tokens).

Saved like the other architectures: checkpoints under ``run_dir/checkpoints`` (atoms, labels, b,
step; safetensors + JSON manifest) and the final ``run_dir/sae`` bundle, loaded by ``sae.load``.
A resumed fit restarts the stream at the checkpoint's batch with the checkpoint's dictionary, so it
reaches exactly the dictionary of an uninterrupted fit: no atom is lost or duplicated.

Measured (benchmarks/itda.py, demo cache blocks.3.hook_out, 32,768 training tokens, 8,192 held-out):
k = 32, tau = 0.2 gives 2,458 atoms at held-out FVU 0.138 (L0 30.8); tau = 0.4 gives 746 atoms at
0.216; the demo TopK SAE (4,096 latents, k = 32) scores 0.199 on the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import checkpoint as ckpt
from sae import common
from sae.configs import ITDAConfig
from saewb.progress import progress_bar

GRAM_MAX_ATOMS = 8192
"""Above this many atoms MP recomputes correlations instead of holding the n × n Gram matrix."""
PAD_ATOMS = 1024
"""The fit pads the dictionary to a multiple of this (zero rows) so MP compiles for few shapes."""
LABEL_MAX = 2**31 - 1


Config = ITDAConfig


@struct.dataclass
class Params:
    W_dec: Any  # [n, d] unit atoms
    b_dec: Any  # [d] the centre (zeros unless center=True)


@struct.dataclass
class State:
    labels: Any  # [n] int32 tok_idx (or stream position) of each atom


def partition_specs(cfg: ITDAConfig) -> Params:
    return Params(W_dec=common.SHARD_LATENT_ROW, b_dec=common.REPLICATED)


def input_scale_target(cfg: ITDAConfig) -> str:
    return "none"  # atoms are unit vectors and MP is homogeneous: no scale to estimate


def init(cfg: ITDAConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    """An empty dictionary (the fit grows it)."""
    b = np.asarray(sample, np.float32).mean(0) if cfg.center and len(sample) else np.zeros(d, np.float32)
    return Params(W_dec=jnp.zeros((0, d), jnp.float32), b_dec=jnp.asarray(b)), State(
        labels=jnp.zeros((0,), jnp.int32)
    )


def latent_count(cfg: ITDAConfig, params: Params) -> int:
    """Number of latents = atoms in the dictionary (not fixed by the config)."""
    return int(params.W_dec.shape[0])


def matching_pursuit(atoms: jax.Array, x: jax.Array, k: int, use_gram: bool | None = None) -> jax.Array:
    """Dense MP coefficients [B, n] of x [B, d] on unit rows ``atoms`` [n, d] (zero rows are inert)."""
    n = atoms.shape[0]
    if n == 0:
        return jnp.zeros((x.shape[0], 0), x.dtype)
    if use_gram is None:  # the Gram matrix costs n²·d once, recomputing k·B·n·d: pick the cheaper
        use_gram = n <= GRAM_MAX_ATOMS and n < k * x.shape[0]
    return _mp(atoms, x, k, bool(use_gram))


@partial(jax.jit, static_argnums=(2, 3))
def _mp(atoms: jax.Array, x: jax.Array, k: int, use_gram: bool) -> jax.Array:
    rows = jnp.arange(x.shape[0])
    gram = atoms @ atoms.T if use_gram else None

    def body(_, carry):
        f, c, r = carry
        j = jnp.argmax(jnp.abs(c), axis=1)
        a = c[rows, j]
        f = f.at[rows, j].add(a)
        if use_gram:
            c = c - a[:, None] * gram[j]
        else:
            r = r - a[:, None] * atoms[j]
            c = r @ atoms.T
        return f, c, r

    c0 = x @ atoms.T
    f, _, _ = jax.lax.fori_loop(0, k, body, (jnp.zeros_like(c0), c0, x))
    return f


def encode(cfg: ITDAConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    return matching_pursuit(params.W_dec, x - params.b_dec, cfg.k)


def decode(cfg: ITDAConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def fold_scale(cfg: ITDAConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    return params, state  # fitted on raw activations


# --------------------------------------------------------------------------------------------- fit


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(x, axis=1)
    return x / np.maximum(norms, 1e-12)[:, None], norms


def select_new_atoms(
    u: np.ndarray, loss: np.ndarray, labels: np.ndarray, known: set[int], tau: float, room: int
) -> np.ndarray:
    """Indices (into the batch, in stream order) of the tokens to add: MP loss > tau, label not yet an
    atom, not within tau of a candidate accepted earlier in this batch, at most ``room`` of them."""
    cand = [i for i in np.flatnonzero(loss > tau).tolist() if int(labels[i]) not in known]
    if not cand or room <= 0:
        return np.zeros(0, np.int64)
    uc = u[cand].astype(np.float64)
    close = (uc @ uc.T) ** 2 >= 1.0 - tau  # a single accepted atom reconstructs the other within tau
    taken: list[int] = []
    blocked = np.zeros(len(cand), bool)
    seen_labels: set[int] = set()
    for pos, i in enumerate(cand):
        if blocked[pos] or int(labels[i]) in seen_labels:
            continue
        taken.append(i)
        seen_labels.add(int(labels[i]))
        blocked |= close[pos]
        if len(taken) == room:
            break
    return np.asarray(taken, np.int64)


class _Dictionary:
    """The growing dictionary, padded to a multiple of PAD_ATOMS rows for MP."""

    def __init__(self, d: int, atoms: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        self.d = d
        self.atoms = np.zeros((0, d), np.float32) if atoms is None else np.asarray(atoms, np.float32)
        self.labels = np.zeros(0, np.int32) if labels is None else np.asarray(labels, np.int32)
        self.known = set(self.labels.tolist())
        self._padded: jax.Array | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def padded(self) -> jax.Array:
        if self._padded is None:
            cap = max(PAD_ATOMS, -(-len(self) // PAD_ATOMS) * PAD_ATOMS)
            buf = np.zeros((cap, self.d), np.float32)
            buf[: len(self)] = self.atoms
            self._padded = jnp.asarray(buf)
        return self._padded

    def add(self, u: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        self.atoms = np.concatenate([self.atoms, u.astype(np.float32)])
        self.labels = np.concatenate([self.labels, labels.astype(np.int32)])
        self.known.update(labels.tolist())
        self._padded = None


def _split_batch(batch: Any, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(batch, tuple):
        idx, x = batch
        idx = np.asarray(idx, np.int64)
    else:
        x = batch
        idx = step * batch_size + np.arange(len(x), dtype=np.int64)  # position in the stream
    x = np.asarray(x, np.float32)
    if len(idx) and int(idx.max()) > LABEL_MAX:
        raise ValueError(f"token index {int(idx.max())} does not fit the int32 ITDA labels")
    return idx, x


def _templates(d: int, n: int) -> dict[str, Any]:
    return {
        "params": Params(W_dec=np.zeros((n, d), np.float32), b_dec=np.zeros(d, np.float32)),
        "state": State(labels=np.zeros(n, np.int32)),
    }


def load_saved(cfg: ITDAConfig, path: Path, manifest: dict[str, Any]) -> tuple[Params, State, dict[str, Any]]:
    """(params, state, final metrics) of a saved ITDA or of one of its checkpoints (sizes from the manifest)."""
    trees, _ = ckpt.read_bundle(Path(path), _templates(int(manifest["d"]), int(manifest["n_atoms"])))
    return trees["params"], trees["state"], manifest.get("final_metrics", {})


def fit(
    cfg: ITDAConfig,
    tc: Any,
    batches: Callable[[int], Iterator[Any]],
    *,
    run_dir: str | Path | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    local_batches: Any = None,
) -> Any:
    """Build (or resume) an ITDA over ``tc.train_tokens // tc.batch_size`` batches of ``batches(start)``.

    ``batches(start)`` yields float32 [batch_size, d] arrays or (tok_idx [B], x [B, d]) pairs (then
    the atoms are labelled with tok_idx; otherwise with their position in the stream), starting at
    batch ``start``, deterministically. Same signature and result type as ``sae.trainer.train``
    (one process only: ``local_batches`` is refused).
    """
    from sae.lifecycle import (
        checkpoint_meta,
        config_record,
        finish_training,
        resume_manifest,
        stop_diverged,
        write_checkpoint,
    )
    from sae.trainer import divergence

    if local_batches is not None or jax.process_count() > 1:
        raise ValueError(
            "the ITDA fit runs in a single process (it is cheap); start it without jax.distributed"
        )
    if getattr(tc, "compute_dtype", "float32") != "float32":
        raise ValueError("the ITDA fit runs in float32; drop --compute-dtype")
    from sae.base import validate_config

    tc.validate()
    validate_config(cfg)
    record = config_record(cfg, tc)
    run_dir = Path(run_dir) if run_dir is not None else None
    resume = resume_manifest(run_dir, record)
    history: list[dict[str, float]] = []
    last_row: dict[str, float] = {}
    if resume is not None:
        latest, manifest = resume
        params, state, _ = load_saved(cfg, latest, manifest)
        d = int(manifest["d"])
        b_dec = np.asarray(params.b_dec)
        book = _Dictionary(d, np.asarray(params.W_dec), np.asarray(state.labels))
        start = int(manifest["step"])
        last_row = manifest.get("last_metrics", {})
    else:
        sample = []
        have = 0
        for batch in batches(0):
            sample.append(_split_batch(batch, 0, tc.batch_size)[1])
            have += len(sample[-1])
            if have >= tc.init_sample_tokens or not cfg.center:
                break
        first = np.concatenate(sample)[: tc.init_sample_tokens]
        d = int(first.shape[1])
        b_dec = first.mean(0).astype(np.float32) if cfg.center else np.zeros(d, np.float32)
        book = _Dictionary(d)
        start = 0

    def save(step: int) -> None:
        assert run_dir is not None
        if not (np.isfinite(book.atoms).all() and np.isfinite(b_dec).all()):
            raise stop_diverged(
                run_dir, f"diverged: the dictionary turned non-finite by batch {step}", "the ITDA fit"
            )
        trees = {"params": Params(W_dec=book.atoms, b_dec=b_dec), "state": State(labels=book.labels)}
        meta = checkpoint_meta(
            record, d, 1.0, history[-1] if history else last_row, extra_meta, n_atoms=len(book)
        )
        write_checkpoint(run_dir, step, trees, meta, tc.keep_checkpoints, on_checkpoint)

    total = tc.total_steps
    bar = progress_bar("fit itda", total, initial=start, unit="batch", enabled=progress)
    win = {"err": 0.0, "var": 0.0, "l0": 0.0, "loss": 0.0, "tokens": 0, "steps": 0, "added": 0}
    fires = np.zeros(0)
    n_window = len(book)  # atoms present for the whole log window (dead/dense are about these)
    t_last = time.perf_counter()
    it = batches(start)
    step = start
    while step < total:
        idx, x = _split_batch(next(it), step, tc.batch_size)
        if x.shape != (tc.batch_size, d):
            raise ValueError(
                f"data iterator gave a batch of shape {x.shape}, expected ({tc.batch_size}, {d})"
            )
        u, norms = _unit(x - b_dec)
        n_before = len(book)
        if n_before:
            f = np.asarray(matching_pursuit(book.padded(), jnp.asarray(u), cfg.k))[:, :n_before]
            u_hat = f @ book.atoms
        else:
            f = np.zeros((len(u), 0), np.float32)
            u_hat = np.zeros_like(u)
        loss = np.sum(np.square(u - u_hat), axis=1)
        room = cfg.max_atoms - n_before
        new = select_new_atoms(u, loss, idx, book.known, cfg.tau, room)
        book.add(u[new], idx[new])
        # metrics of the batch as decomposed before this batch's atoms joined
        x_hat = norms[:, None] * u_hat + b_dec
        win["err"] += float(np.sum(np.square(x - x_hat)))
        win["var"] += float(np.sum(np.square(x - x.mean(0))))
        win["l0"] += float(np.mean(np.sum(f != 0, axis=1)))
        win["loss"] += float(loss.mean())
        win["tokens"] += len(x)
        win["steps"] += 1
        win["added"] += len(new)
        fires = np.concatenate([fires, np.zeros(len(book) - len(fires))])
        fires[:n_before] += np.sum(f != 0, axis=0)
        step += 1
        if step % tc.log_every == 0 or step == total:
            now = time.perf_counter()
            steps = max(win["steps"], 1)
            row = {
                "step": step,
                "tokens": step * tc.batch_size,
                "loss": win["loss"] / steps,
                "fvu": win["err"] / max(win["var"], 1e-12),
                "l0": win["l0"] / steps,
                "dead_frac": float(np.mean(fires[:n_window] == 0)) if n_window else 0.0,
                "dense_frac": float(np.mean(fires[:n_window] / max(win["tokens"], 1) > tc.dense_threshold))
                if n_window
                else 0.0,
                "lr": 0.0,
                "tokens_per_s": win["tokens"] / max(now - t_last, 1e-9),
                "n_atoms": float(len(book)),
                "added": float(win["added"]),
            }
            reason = divergence(row, history, explosion=False)
            if reason is not None:
                raise stop_diverged(run_dir, reason, "the ITDA fit")
            history.append(row)
            if on_log is not None:
                on_log(row)
            bar.set_postfix(atoms=len(book), fvu=f"{row['fvu']:.4f}")
            win = dict.fromkeys(win, 0)
            win["err"] = win["var"] = win["l0"] = win["loss"] = 0.0
            fires = np.zeros(len(book))
            n_window = len(book)
            t_last = time.perf_counter()
        if run_dir is not None and (step % tc.ckpt_every == 0 or step == total):
            save(step)
        bar.update(1)
    bar.close()
    if len(book) == 0:
        raise ValueError("the ITDA dictionary is empty: train on at least one batch")
    params = Params(W_dec=jnp.asarray(book.atoms), b_dec=jnp.asarray(b_dec))
    state = State(labels=jnp.asarray(book.labels))
    return finish_training(cfg, tc, params, state, 1.0, d, history, last_row, run_dir, n_atoms=len(book))


# ------------------------------------------------------------------------------------ comparison


def labels_of(model: Any) -> np.ndarray:
    """Atom labels of a loaded ITDA (``sae.load``), a fit result, or an array of labels."""
    if isinstance(model, np.ndarray | list | tuple):
        return np.asarray(model)
    state = getattr(model, "state", None) or getattr(model, "arch_state", None)
    if not isinstance(state, State):
        raise TypeError(
            f"{type(model).__name__} is not an ITDA (no atom labels); pass a loaded ITDA or labels"
        )
    return np.asarray(state.labels)


def jaccard(itda_a: Any, itda_b: Any) -> float:
    """Jaccard index |A ∩ B| / |A ∪ B| of two ITDAs' atom label sets (the paper's similarity of two
    models or layers). Labels are the harvest's tok_idx, so both must come from the same harvest (or
    from harvests of the same corpus with the same tokeniser and token numbering)."""
    a, b = set(labels_of(itda_a).tolist()), set(labels_of(itda_b).tolist())
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def atom_tokens(model: Any, workspace: Any, harvest: str | None = None) -> dict[str, np.ndarray]:
    """Each atom's (tok_idx, doc_id, pos, token_str) from the workspace's tokens table, in atom order."""
    from activations.store import harvest_info, token_rows
    from saewb.workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    info = harvest_info(ws, harvest)
    labels = labels_of(model).astype(np.int64)
    table = token_rows(ws, info.name, labels.tolist(), ("tok_idx", "doc_id", "pos", "token_str"))
    tok = table.column("tok_idx").to_numpy()
    order = np.argsort(tok)
    where = np.searchsorted(tok[order], labels)
    if len(tok) != len(np.unique(labels)) or not np.array_equal(
        tok[order][np.minimum(where, len(tok) - 1)], labels
    ):
        raise ValueError(
            f"some atom labels are not tokens of harvest {info.name!r}; was the ITDA fitted on it?"
        )
    pick = order[where]
    return {
        "tok_idx": labels,
        "doc_id": table.column("doc_id").to_numpy()[pick],
        "pos": table.column("pos").to_numpy()[pick],
        "token_str": np.asarray(table.column("token_str").to_pylist(), dtype=object)[pick],
    }
