"""Native CPU kernels, compiled on first use and called through XLA's FFI.

Only one for now: ``top_k``, equal to ``jax.lax.top_k`` index for index but several times faster
on CPU (see ``top_k.cc``). The shared library is built once per machine with the system C++
compiler into ``$SAEWB_CACHE_DIR`` (default ``~/.cache/saewb``) under a hash of the source, the
compiler flags, jaxlib's version and the CPU's flags, so a cache shared between machines never
serves a library built for another CPU. Set ``SAEWB_NATIVE=0`` to turn it off; without a
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

SOURCE = Path(__file__).with_name("top_k.cc")
TARGETS = {"saewb_top_k_f32": "SaewbTopKF32", "saewb_relu_top_k_f32": "SaewbReluTopKF32"}
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
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), jax.__version__.encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
    lib = cache_dir() / key.hexdigest()[:16] / "libsaewb_native.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
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
        log.warning("no C++ compiler (g++ or clang++) found: top-k runs in plain XLA, slower on CPU. "
                    "Install one (apt install g++) or set SAEWB_NATIVE=0 to silence this.")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("native top-k kernel unavailable, top-k runs in plain XLA (set SAEWB_NATIVE=0 to "
                    "silence this): %s", e)
        return False
    return True


def usable_for(x: jax.Array) -> bool:
    """Whether ``top_k(x, k)`` runs natively here: float32 on the CPU backend, kernels built."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and jax.default_backend() == "cpu" and available()


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


def _call(target: str, k: int, *args: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = args[0].shape[:-1] + (k,)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    # plain rows batch freely; bias and scale belong to one SAE, so vmapped SAEs go one by one
    vmap = "broadcast_all" if len(args) == 1 else "sequential"
    vals, idx = jax.ffi.ffi_call(target, out, vmap_method=vmap)(*args, k=np.int64(k))
    return vals, idx
