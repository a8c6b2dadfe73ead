"""Native CPU kernels, compiled on first use and called through XLA's FFI.

``top_k``, ``relu_top_k``, ``dead_top_k`` and ``relu_top_k_and_dead`` (``top_k.cc``): equal to
``jax.lax.top_k`` (of the masked scores for the dead searches) index for index but several times
faster on CPU. ``weighted_row_sum``, ``row_dots`` and ``scatter_outer`` (``sparse.cc``): the row
gathers and scatters of the sparse TopK backward (``sae.sparse_ops``), multi-threaded. The shared
library is built once per machine with the system C++ compiler into ``$SAEWB_CACHE_DIR`` (default
``~/.cache/saewb``) under a hash of the source, the compiler flags, jaxlib's version and the CPU's
flags, so a cache shared between machines never serves a library built for another CPU. Set ``SAEWB_NATIVE=0`` to turn it off; without a
compiler, or if the build fails, callers fall back to pure XLA after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("top_k.cc", "sparse.cc"))
HEADERS = (Path(__file__).with_name("parallel.h"),)
TARGETS = {
    "saewb_top_k_f32": "SaewbTopKF32",
    "saewb_relu_top_k_f32": "SaewbReluTopKF32",
    "saewb_relu_top_k_and_dead_f32": "SaewbReluTopKAndDeadF32",
    "saewb_dead_top_k_f32": "SaewbDeadTopKF32",
    "saewb_weighted_row_sum_f32": "SaewbWeightedRowSumF32",
    "saewb_row_dots_f32": "SaewbRowDotsF32",
    "saewb_scatter_outer_f32": "SaewbScatterOuterF32",
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("SAEWB_CACHE_DIR", Path.home() / ".cache" / "saewb")) / "native"


def _build(compiler: str) -> Path:
    """The shared library, compiled unless already in the cache (written atomically, so concurrent
    builds in several processes are safe)."""
    key = hashlib.sha256()
    for part in (
        *(f.read_bytes() for f in SOURCES + HEADERS),
        " ".join(FLAGS).encode(),
        compiler.encode(),
        jax.__version__.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        key.update(part)
    lib = cache_dir() / key.hexdigest()[:16] / "libsaewb_native.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[:2000]}")
        os.replace(out, lib)
    return lib


@functools.cache
def available() -> bool:
    """Whether the native kernels are built and registered with XLA's CPU backend (once per process)."""
    if os.environ.get("SAEWB_NATIVE", "1") == "0" or platform.system() != "Linux":
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        log.warning(
            "no C++ compiler (g++ or clang++) found: top-k and the sparse kernels run in plain XLA, "
            "slower on CPU. "
            "Install one (apt install g++) or set SAEWB_NATIVE=0 to silence this."
        )
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning(
            "native kernels unavailable, top-k and the sparse kernels run in plain XLA (set SAEWB_NATIVE=0 to "
            "silence this): %s",
            e,
        )
        return False
    return True


def usable_for(x: jax.Array) -> bool:
    """Whether ``top_k(x, k)`` runs natively here: float32 on the CPU backend, kernels built."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and jax.default_backend() == "cpu" and available()


def serves(*arrays: jax.Array) -> bool:
    """Whether the native kernels serve these float32 operands here: ``usable_for`` each, and no mesh
    (XLA cannot partition a custom call)."""
    return jax.sharding.get_abstract_mesh().empty and all(usable_for(a) for a in arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` over the last axis of a float32 array, by the native kernel (check
    ``usable_for`` first). Differentiable in the values, like ``lax.top_k``."""
    return _call("saewb_top_k_f32", k, x)


@top_k.defjvp
def _top_k_jvp(k: int, primals: tuple[jax.Array], tangents: tuple[jax.Array]):
    (x,), (dx,) = primals, tangents
    vals, idx = top_k(x, k)
    return (vals, idx), (jnp.take_along_axis(dx, idx, axis=-1), np.zeros(idx.shape, jax.dtypes.float0))


def relu_top_k(z: jax.Array, bias: jax.Array, scale: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(relu(z + bias) * scale, k)`` without forming the scores: z [..., n] float32,
    bias and scale with n elements ([n] or [1, n]). For selection only: no gradient."""
    return _call("saewb_relu_top_k_f32", k, *(jax.lax.stop_gradient(a) for a in (z, bias, scale)))


def dead_top_k(score: jax.Array, dead: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(where(dead, score, -inf), k)`` over the last axis without forming the masked
    array, looking again only at the dead columns whose score beats the running floor (``dead``: bool,
    n elements). For selection only: no gradient."""
    return _call("saewb_dead_top_k_f32", k, jax.lax.stop_gradient(score), dead.astype(jnp.bool_))


def relu_top_k_and_dead(
    z: jax.Array, bias: jax.Array, scale: jax.Array, dead: jax.Array, k: int, k_aux: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``relu_top_k``'s (values, indices) and, from the same scores in the same pass, those of
    ``jax.lax.top_k(where(dead, scores, -inf), k_aux)``: AuxK's picks among the ``dead`` latents (bool,
    n elements). For selection only: no gradient."""
    z, bias, scale = (jax.lax.stop_gradient(a) for a in (z, bias, scale))
    rows = z.shape[:-1]
    out = tuple(
        jax.ShapeDtypeStruct(rows + (width,), dtype)
        for width in (k, k_aux)
        for dtype in (jnp.float32, jnp.int32)
    )
    call = jax.ffi.ffi_call("saewb_relu_top_k_and_dead_f32", out, vmap_method="sequential")
    return call(z, bias, scale, dead.astype(jnp.bool_), k=np.int64(k), k_aux=np.int64(k_aux))


def _call(target: str, k: int, *args: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = args[0].shape[:-1] + (k,)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    # plain rows batch freely; bias and scale belong to one SAE, so vmapped SAEs go one by one
    vmap = "broadcast_all" if len(args) == 1 else "sequential"
    vals, idx = jax.ffi.ffi_call(target, out, vmap_method=vmap)(*args, k=np.int64(k))
    return vals, idx


def weighted_row_sum(vals: jax.Array, idx: jax.Array, m: jax.Array) -> jax.Array:
    """[B, d] = Σ_j vals[:, j] · m[idx[:, j]] for vals, idx [B, k] and m [n, d]. No gradient rule: the
    callers are ``sae.sparse_ops``'s custom VJPs."""
    out = jax.ShapeDtypeStruct((idx.shape[0], m.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("saewb_weighted_row_sum_f32", out, vmap_method="sequential")(
        vals, idx.astype(jnp.int32), m
    )


def row_dots(g: jax.Array, idx: jax.Array, m: jax.Array) -> jax.Array:
    """[B, k] of g[b] · m[idx[b, j]] for g [B, d], idx [B, k] and m [n, d]. No gradient rule."""
    out = jax.ShapeDtypeStruct(idx.shape, jnp.float32)
    return jax.ffi.ffi_call("saewb_row_dots_f32", out, vmap_method="sequential")(g, idx.astype(jnp.int32), m)


def scatter_outer(
    coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int, transposed: bool = False
) -> tuple[jax.Array, jax.Array]:
    """([n, d] with coef[b, j] · rows[b] summed at row idx[b, j], [n] with coef summed at idx) for coef,
    idx [B, k] and rows [B, d]; ``transposed`` gives the first as [d, n]. No gradient rule."""
    d = rows.shape[1]
    out = (
        jax.ShapeDtypeStruct((d, n) if transposed else (n, d), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    call = jax.ffi.ffi_call("saewb_scatter_outer_f32", out, vmap_method="sequential")
    return call(coef, idx.astype(jnp.int32), rows, transposed=transposed)
