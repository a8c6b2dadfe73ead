"""Training across devices: a ("data", "model") mesh, state layouts and a sharded top-k.

* The batch is split over ``data`` (data parallelism: every data shard holds a full copy of the
  parameters that are not split over ``model``).
* The latent axis of W_enc, W_dec, b_enc and of every per-latent array (Adam moments, dead-latent
  counters, fire counts, GBA biases and frequencies, ...) is split over ``model``; b_dec and the
  scalars are replicated. Each architecture states its parameters' layout in ``partition_specs(cfg)``;
  its state's layout comes from ``state_partition_specs(cfg)`` when the module has one, otherwise
  from the shapes: a state leaf whose first axis has length n_latents is split over ``model``.
* The train step is one ``jax.jit`` over the whole mesh (XLA inserts the collectives). The one
  operation that does not partition well by itself, the top-k over latents, runs in ``shard_map``:
  see ``sharded_top_k``.

A layout never changes the arithmetic, only where it runs: a sharded run matches a single-device
one up to the order of float reductions, and checkpoints are gathered to the host before writing,
so a run saved on one mesh resumes on any other.

With several processes (``sae.distributed``), the mesh spans every process's devices and each
process feeds only the rows of the global batch that its devices hold (``process_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sae import native

DATA_AXIS = "data"
"""Mesh axis the batch is split over."""
MODEL_AXIS = "model"
"""Mesh axis the latent dimension is split over."""
BATCH_SPEC = PartitionSpec(DATA_AXIS, None)
REPLICATED = PartitionSpec()


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def mesh_shape(
    mesh_data: int, mesh_model: int, n_devices: int | None = None, n_processes: int | None = None
) -> tuple[int, int]:
    """The (data, model) shape to use; raises naming the fix when the devices do not fit.

    One process: exactly the configured shape (1 x 1 = no mesh at all). Several processes: the mesh
    must cover every device, so the default 1 x 1 becomes (all devices) x 1.
    """
    n_devices = jax.device_count() if n_devices is None else n_devices
    n_processes = jax.process_count() if n_processes is None else n_processes
    if mesh_data < 1 or mesh_model < 1:
        raise ValueError(f"mesh_data and mesh_model must be >= 1, got {mesh_data} x {mesh_model}")
    if n_processes > 1 and mesh_data * mesh_model == 1:
        return n_devices, 1
    if mesh_data * mesh_model > n_devices:
        raise ValueError(
            f"mesh {mesh_data} x {mesh_model} needs {mesh_data * mesh_model} devices but JAX sees {n_devices}; "
            "lower --mesh-data / --mesh-model (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "simulates N devices)"
        )
    if n_processes > 1 and mesh_data * mesh_model != n_devices:
        raise ValueError(
            f"with {n_processes} processes the mesh must use all {n_devices} devices, got "
            f"{mesh_data} x {mesh_model}; set --mesh-data x --mesh-model = {n_devices}"
        )
    return mesh_data, mesh_model


def make_mesh(mesh_data: int, mesh_model: int) -> Mesh | None:
    """The ("data", "model") mesh for a config; None for one device in one process (no sharding)."""
    data, model = mesh_shape(mesh_data, mesh_model)
    if data * model == 1 and jax.process_count() == 1:
        return None
    axes = (DATA_AXIS, MODEL_AXIS)
    auto = (AxisType.Auto, AxisType.Auto)
    if data * model == jax.device_count():
        return jax.make_mesh((data, model), axes, axis_types=auto)  # topology-aware device order
    devices = np.asarray(jax.devices()[: data * model]).reshape(data, model)
    return Mesh(devices, axes, axis_types=auto)


def check_divisible(mesh: Mesh, batch_size: int, n_latents: int) -> None:
    data, model = mesh.shape[DATA_AXIS], mesh.shape[MODEL_AXIS]
    if batch_size % data:
        raise ValueError(f"batch_size={batch_size} is not divisible by mesh_data={data}; change one of them")
    if n_latents % model:
        raise ValueError(f"n_latents={n_latents} is not divisible by mesh_model={model}; change one of them")
    procs = jax.process_count()
    if batch_size % procs:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {procs} processes; change it")


def _latent_spec(leaf: Any, n_latents: int) -> PartitionSpec:
    shape = np.shape(leaf)
    if len(shape) >= 1 and shape[0] == n_latents:
        return PartitionSpec(MODEL_AXIS, *([None] * (len(shape) - 1)))
    return REPLICATED


def param_specs(arch: Any, cfg: Any, params: Any) -> Any:
    """The architecture's ``partition_specs(cfg)``, checked against the params' structure and ranks."""
    specs = arch.partition_specs(cfg)
    want = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(specs, is_leaf=_is_spec)
    if want != got:
        raise ValueError(
            f"{arch.__name__}.partition_specs(cfg) has structure {got}, but the params are {want}; "
            "give one PartitionSpec per parameter"
        )
    for leaf, spec in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(specs, is_leaf=_is_spec), strict=True
    ):
        if len(spec) > np.ndim(leaf):
            raise ValueError(
                f"{arch.__name__}.partition_specs: {spec} has more axes than a {np.shape(leaf)} parameter"
            )
    return specs


def state_specs(arch: Any, cfg: Any, state: Any) -> Any:
    """The architecture state's layout: its module's ``state_partition_specs(cfg)`` or by shape."""
    from sae.base import optional

    custom = optional(arch, "state_partition_specs")
    if custom is not None:
        return custom(cfg)
    return jax.tree_util.tree_map(lambda leaf: _latent_spec(leaf, cfg.n_latents), state)


def train_state_specs(arch: Any, cfg: Any, tx: Any, ts: Any) -> Any:
    """PartitionSpecs for a whole ``TrainState`` (params, Adam moments, arch state, counters)."""
    pspecs = param_specs(arch, cfg, ts.params)
    try:  # the Adam moments mirror the params; counts and empty states stay replicated
        ospecs = optax.tree_map_params(
            tx,
            lambda _, spec: spec,
            ts.opt_state,
            pspecs,
            transform_non_params=lambda _: REPLICATED,
            is_leaf=_is_spec,
        )
    except (ValueError, TypeError):  # an optimiser optax cannot map: fall back to shapes
        ospecs = jax.tree_util.tree_map(lambda leaf: _latent_spec(leaf, cfg.n_latents), ts.opt_state)
    n = cfg.n_latents
    return ts.replace(
        params=pspecs,
        opt_state=ospecs,
        arch_state=state_specs(arch, cfg, ts.arch_state),
        since_fired=PartitionSpec(MODEL_AXIS),
        step=REPLICATED,
        rng=REPLICATED,
        win=jax.tree_util.tree_map(lambda leaf: _latent_spec(leaf, n), ts.win),
    )


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs → NamedShardings on ``mesh`` (same tree)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of ``tree`` (host or device arrays, the same values on every process) on its sharding.

    Every leaf gets a buffer of its own (the train step donates its input).
    """
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.array(x), s), tree, shardings)

    def put(x: Any, s: NamedSharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def to_host(tree: Any) -> Any:
    """Numpy copies of every leaf; with several processes the shards are gathered (a collective:
    every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows [lo, hi) of each global batch that this process's devices hold.

    With the default device order, process i of P holds rows [i·B/P, (i+1)·B/P) when the data
    axis spans the processes, and every row when it does not (a model axis across hosts).
    """
    sharding = NamedSharding(mesh, BATCH_SPEC)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
        rows.update(range(*index[0].indices(batch_size)))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(
            f"process {jax.process_index()}'s devices hold non-contiguous rows of the batch on mesh {dict(mesh.shape)}; "
            "order the devices so each process holds one block of the data axis"
        )
    return slice(lo, hi)


def put_batch(batch: np.ndarray, mesh: Mesh, batch_size: int) -> jax.Array:
    """A [batch_size, d] global array split over ``data`` from the full batch (one process) or from
    this process's rows of it (several processes)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.make_array_from_process_local_data(sharding, batch, (batch_size, batch.shape[1]))


def sharded_top_k(score: jax.Array, k: int, local_k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(score, k)`` over the last axis of a [B, n] array split over the context mesh.

    Each ``model`` shard takes its local top-k' of its n/M latents (k' = ``local_k``, default k),
    the M·k' candidates (values and global indices) are gathered over ``model``, and the global
    top-k is taken among them. With k' = k this is exact: every member of the global top-k is in
    its own shard's top-k. Ties resolve as in ``lax.top_k`` (lower index first), because the
    candidates are laid out shard by shard, each shard's in index order among equal values, so the
    result equals the unsharded one index for index. k' < k is OpenAI's capacity-factor
    approximation (less communication, may drop a latent when one shard holds more than k' of the
    top k); it is not used by the trainers.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = score.shape[-1]
    kl = min(k if local_k is None else local_k, n // mesh.shape[MODEL_AXIS])
    if kl * mesh.shape[MODEL_AXIS] < k:
        raise ValueError(
            f"local_k={local_k} x {mesh.shape[MODEL_AXIS]} shards gives fewer than k={k} candidates"
        )

    def local(s: jax.Array) -> tuple[jax.Array, jax.Array]:
        vals, idx = jax.lax.top_k(s, kl)
        idx = idx + jax.lax.axis_index(MODEL_AXIS) * s.shape[-1]
        vals = jax.lax.all_gather(vals, MODEL_AXIS, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx, MODEL_AXIS, axis=1, tiled=True)
        top, pos = jax.lax.top_k(vals, k)
        return top, jnp.take_along_axis(idx, pos, axis=1)

    # after the all_gather the outputs are equal on every model shard (check_vma cannot infer it)
    out = PartitionSpec(DATA_AXIS, None)
    fn: Callable[..., Any] = jax.shard_map(
        local, in_specs=PartitionSpec(DATA_AXIS, MODEL_AXIS), out_specs=(out, out), check_vma=False
    )
    return fn(score)


def model_shards() -> int:
    """Size of the ``model`` axis of the mesh in context while tracing (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL_AXIS not in mesh.shape:
        return 1
    return int(mesh.shape[MODEL_AXIS])


TOP_K_BLOCK = 16
"""Block width of ``block_top_k``: 16 was fastest of 8 to 128 (B = 4096, n = 16384, k = 32, CPU)."""


def block_top_k(score: jax.Array, k: int, block: int = TOP_K_BLOCK) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(score, k)`` over [B, n], index for index, searching k·block candidates.

    Rows are cut into blocks of ``block``; every member of the top k lies in a block whose maximum
    is among the k largest block maxima (fewer than k blocks can hold a larger element). Those k
    blocks, taken in index order so that ties break as ``lax.top_k``'s (lower index first), give
    the candidates. On CPU the search alone took 68 ms against 130 ms (B = 4096, n = 16384, k = 32),
    and a whole TopK step 488 ms against 531 ms under huge-page malloc (equal with 4 kB pages).
    Needs n divisible by ``block``.
    """
    b, n = score.shape
    blocks = score.reshape(b, n // block, block)
    _, best = jax.lax.top_k(jnp.max(blocks, axis=2), k)
    best = jnp.sort(best, axis=1)
    candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(b, k * block)
    vals, pos = jax.lax.top_k(candidates, k)
    return vals, jnp.take_along_axis(best, pos // block, axis=1) * block + pos % block


def top_k(score: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k over latents [B, n]: ``sharded_top_k`` under a mesh whose model axis is > 1 (and
    divides n and the batch splits over data); on CPU the native kernel outside a mesh, else
    ``block_top_k`` where it applies; ``jax.lax.top_k`` otherwise. All return the same values and
    indices."""
    m = model_shards()
    if m > 1 and score.ndim == 2 and score.shape[1] % m == 0:
        data = jax.sharding.get_abstract_mesh().shape.get(DATA_AXIS, 1)
        if score.shape[0] % data == 0:
            return sharded_top_k(score, k)
    if native.serves(score):
        return native.top_k(score, k)
    n = score.shape[-1]
    if (
        score.ndim == 2
        and jax.default_backend() == "cpu"
        and n % TOP_K_BLOCK == 0
        and 4 * k * TOP_K_BLOCK <= n
    ):
        return block_top_k(score, k)
    return jax.lax.top_k(score, k)
