"""Multi-process (multi-host) set-up through `jax.distributed`, and the helpers that depend on it.

One process runs per host (per GPU host, or per TPU VM worker); together they see every device as
one global `jax.devices()` list, over which `train.make_mesh` builds the mesh. Replicated arrays are
identical in every process, so each process can read its own copy (`to_host`); only process 0
writes logs, results and plots, while checkpoints are written collectively by orbax.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from iwsft.errors import UserError


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the processes of one run; a no-op for a single process.

  coordinator_address "host:port" (of process 0) with num_processes and process_id: explicit set-up.
  coordinator_address "auto": jax detects the cluster itself (Cloud TPU pod slices, SLURM, Open
  MPI),
  as it also does when JAX_COORDINATOR_ADDRESS is set. On CPU the processes exchange data through
  gloo collectives.
  """
  auto = coordinator_address == "auto" or (
    not coordinator_address and os.environ.get("JAX_COORDINATOR_ADDRESS")
  )
  if not coordinator_address and not auto:
    if num_processes > 1 or process_id >= 0:
      raise UserError(
        "--num_processes/--process_id need --coordinator_address (host:port of process 0)"
      )
    return
  if not auto and (num_processes < 1 or not 0 <= process_id < num_processes):
    raise UserError(
      f"with --coordinator_address, give --num_processes >= 1 and --process_id in "
      f"[0, num_processes), got {num_processes} and {process_id}"
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address, num_processes=num_processes, process_id=process_id
    )


def is_primary() -> bool:
  """Whether this process writes logs, results and plots (process 0)."""
  return jax.process_index() == 0


def to_host(tree):
  """Numpy copies of a pytree of arrays, readable in every process: replicated arrays from a local
  copy, arrays split across processes (FSDP) gathered."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches the same named point (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def allgather(x) -> np.ndarray:
  """[P, ...]: a host array of the same shape from every process, in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def sum_over_processes(x) -> np.ndarray:
  """The sum of a host array over processes; for one process, the array itself (same numerics)."""
  return np.asarray(x) if jax.process_count() == 1 else allgather(x).sum(axis=0)
