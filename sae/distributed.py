"""Several processes (hosts) training one SAE: ``jax.distributed`` set-up from flags or environment.

Every process runs the same ``saewb train`` command with its own process id; JAX then sees the
devices of all processes as one set, the trainer's mesh spans them, and each process reads only
its rows of each global batch (``ActivationStream.batches(rows=...)``), so the global batch is
exactly the single-process one. Process 0 writes the checkpoints, the final SAE and the workspace
rows. See docs/scaling.md for TPU pod slices and multi-GPU nodes.

Settings, flags first, then environment:

* ``--coordinator`` / ``SAEWB_COORDINATOR``: ``host:port`` of process 0's coordination service, or
  ``auto`` to let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI);
* ``--num-processes`` / ``SAEWB_NUM_PROCESSES`` and ``--process-id`` / ``SAEWB_PROCESS_ID``.
"""

from __future__ import annotations

import os

import numpy as np

ENV_COORDINATOR = "SAEWB_COORDINATOR"
ENV_NUM_PROCESSES = "SAEWB_NUM_PROCESSES"
ENV_PROCESS_ID = "SAEWB_PROCESS_ID"


def settings(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[str, int | None, int | None] | None:
    """(coordinator, num_processes, process_id) from the arguments or the environment; None when
    no coordinator is set (one process). Raises naming the missing setting."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                "--num-processes / --process-id need --coordinator host:port (or SAEWB_COORDINATOR), "
                "the address of process 0"
            )
        return None
    if coordinator == "auto":
        return coordinator, num_processes, process_id
    if num_processes is None or process_id is None:
        raise ValueError(
            f"--coordinator {coordinator} needs --num-processes and --process-id "
            f"(or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"need 0 <= process_id < num_processes, got {process_id} of {num_processes}")
    return coordinator, num_processes, process_id


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the cluster (``jax.distributed.initialize``) when a coordinator is set; False otherwise.

    Must run before anything touches a JAX device.
    """
    found = settings(coordinator, num_processes, process_id)
    if found is None:
        return False
    import jax

    address, n, pid = found
    if address == "auto":
        jax.distributed.initialize(num_processes=n, process_id=pid)
    else:
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    return True


def is_lead() -> bool:
    """True on process 0 (the one that writes files and workspace rows)."""
    import jax

    return jax.process_index() == 0


def check_same(value: int, what: str) -> None:
    """Raise on every process unless all processes hold the same integer ``value`` (a collective)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    values = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)
    if len(set(values.tolist())) != 1:
        raise RuntimeError(f"processes disagree on {what}: {values.tolist()} (process i holds entry i)")
