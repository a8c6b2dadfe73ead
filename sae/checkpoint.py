"""Checkpoints: safetensors for arrays, a JSON manifest for everything else. Never pickle.

Layout of a run directory::

    run_dir/checkpoints/step_000000123/{params,opt_state,state}.safetensors + manifest.json
    run_dir/checkpoints/LATEST          # name of the newest complete checkpoint
    run_dir/sae.safetensors + sae.json  # the final SAE, input scale folded in (raw activations)

A checkpoint is written into a temporary directory, fsynced, and renamed into place; LATEST is
then replaced atomically. A kill at any moment leaves either the old or the new checkpoint. The
manifest stores every file's size and sha256, and loading checks them: a truncated or corrupted
checkpoint raises ``CheckpointError`` instead of silently training from scratch.

Checkpoints do not depend on the device mesh: the trainer gathers sharded arrays to the host
before writing (process 0 writes), and places what it reads on whatever mesh the resumed run uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not match the run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """Name every leaf by its pytree path; 0-d leaves are stored with shape [1]."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        out[jax.tree_util.keystr(path)] = np.ascontiguousarray(np.atleast_1d(np.asarray(leaf)))
    return out


def unflatten(template: Any, arrays: dict[str, np.ndarray], what: str) -> Any:
    """Rebuild ``template``'s structure from named arrays, checking names, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in leaves]
    if set(names) != set(arrays):
        raise CheckpointError(
            f"{what}: stored arrays {sorted(set(arrays) - set(names))} / missing {sorted(set(names) - set(arrays))} "
            "do not match this code's state layout; the checkpoint comes from another version or config"
        )
    out = []
    for (_, leaf), name in zip(leaves, names, strict=True):
        # shape and dtype only: a template leaf may be sharded over devices no process holds all of
        shape = np.shape(leaf)
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        arr = arrays[name]
        if arr.size != int(np.prod(shape)) or arr.dtype != dtype:
            raise CheckpointError(
                f"{what}: {name} has shape {arr.shape} {arr.dtype}, expected {shape} {dtype}"
            )
        out.append(jax.numpy.asarray(arr.reshape(shape)))
    return jax.tree_util.tree_unflatten(treedef, out)


def write_bundle(directory: Path, trees: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Atomically write trees (one safetensors file each) plus manifest.json into ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        files: dict[str, dict[str, Any]] = {}
        for name, tree in trees.items():
            fname = f"{name}.safetensors"
            save_file(flatten(tree), str(tmp / fname))
            with open(tmp / fname, "rb+") as fh:
                os.fsync(fh.fileno())
            files[fname] = {"size": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
        manifest = {"format": FORMAT_VERSION, "files": files, **meta}
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.exists():
        raise CheckpointError(
            f"checkpoint {directory} has no manifest.json (incomplete or not a checkpoint); "
            "remove it to fall back to an earlier checkpoint or start a new run under another name"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {directory}: manifest.json is corrupt ({err})") from err
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory}: unsupported format {manifest.get('format')!r}")
    return manifest


def read_bundle(directory: Path, templates: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict]:
    """Verify sizes and checksums, then load. Without templates, returns flat dicts of arrays."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    out: dict[str, Any] = {}
    for fname, info in manifest["files"].items():
        path = directory / fname
        hint = "remove the checkpoint directory to fall back to an earlier one, or retrain under a new name"
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory}: {fname} is missing; {hint}")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"checkpoint {directory}: {fname} is truncated or altered ({size} bytes, manifest says "
                f"{info['size']}); {hint}"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {directory}: {fname} fails its sha256 check (corrupted); {hint}"
            )
        arrays = load_file(str(path))
        name = fname.removesuffix(".safetensors")
        out[name] = (
            arrays if templates is None else unflatten(templates[name], arrays, f"{directory}/{fname}")
        )
    return out, manifest


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, None for a fresh run; raises if the pointer is broken.

    Without a LATEST pointer the newest ``step_*`` directory is it: a directory gets its final name
    only once fsynced whole, so this is a writer killed between the rename and the pointer.
    """
    cdir = checkpoints_dir(run_dir)
    pointer = cdir / "LATEST"
    if not pointer.exists():
        existing = sorted(p for p in cdir.glob("step_*") if p.is_dir()) if cdir.exists() else []
        return existing[-1] if existing else None
    target = cdir / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points at {target.name}, which does not exist")
    return target


def save_checkpoint(
    run_dir: Path, step: int, trees: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    cdir = checkpoints_dir(run_dir)
    target = write_bundle(cdir / f"step_{step:09d}", trees, {"step": step, **meta})
    tmp_ptr = cdir / ".LATEST.tmp"
    with open(tmp_ptr, "w") as fh:
        fh.write(target.name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_ptr, cdir / "LATEST")
    _fsync_dir(cdir)
    for old in sorted(cdir.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in cdir.glob(".tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return target
