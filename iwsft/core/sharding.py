"""Where arrays live: the (data, fsdp, model) device mesh, the per-leaf rule, and the sampling pool.

Batches and the sampling pool (the training sequences on the devices) are split over the data and
fsdp axes along their leading axis, whole on each device of a model group; parameters and
optimiser state are replicated, or split over the "fsdp" axis when large, and over the "model"
axis where the model says (tensor parallelism; state_sharding). The pool is padded to a multiple
of the device count, and each process supplies only its own rows of it (pool_rows, put_pool).

Independent seeds of a small model can instead be split over the devices (seed_mesh,
seed_sharded): each device holds its seeds' whole state and the whole pool, and trains them on
whole batches, with no communication between devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iwsft.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
FSDP_MIN_SIZE = 2**14  # elements; smaller leaves stay replicated under FSDP


def make_mesh(num_devices: int | None = None, fsdp: int = 1, model: int = 1) -> Mesh:
  """A (data, fsdp, model) mesh over the first num_devices devices (all by default).

  fsdp=1, model=1 is plain data parallelism with replicated state. A model group's devices are
  adjacent (the fastest links), then an fsdp group's.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise UserError(f"asked for {num_devices} devices, {len(devices)} available")
    devices = devices[:num_devices]
  if model < 1 or len(devices) % model:
    raise UserError(
      f"tensor_parallel {model} must be a positive divisor of the {len(devices)} devices"
    )
  if fsdp < 1 or len(devices) % (fsdp * model):
    raise UserError(
      f"fsdp {fsdp} must be a positive divisor of the {len(devices) // model} devices left "
      f"by tensor_parallel {model}"
    )
  shape = (len(devices) // (fsdp * model), fsdp, model)
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: the data and fsdp axes (a model group shares its rows)."""
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices of the mesh, the rest replicated."""
  return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))


def seed_pool_sharded(mesh: Mesh, vmapped: bool = True) -> NamedSharding:
  """Per-seed pool leaves [S, N, ...]: the seed axis whole on every device, the rows split as the
  pool's; a single run's [N, ...] (vmapped False) split as the pool."""
  if not vmapped:
    return batch_sharded(mesh)
  return NamedSharding(mesh, P(None, (DATA_AXIS, FSDP_AXIS)))


def seed_mesh(mesh: Mesh, num_seeds: int) -> Mesh:
  """A (data d, fsdp 1) mesh over the first d devices of `mesh`, d the most that share num_seeds
  seeds evenly (5 seeds on 8 devices: 5). One process only: seeds split over hosts would need
  every host to hold every seed's pool; spread whole runs over processes instead."""
  if jax.process_count() > 1:
    raise UserError(
      "seeds over devices runs in one process; spread a sweep's runs over processes (--part)"
    )
  devices = list(mesh.devices.flat)
  d = max(k for k in range(1, min(len(devices), num_seeds) + 1) if num_seeds % k == 0)
  return Mesh(np.asarray(devices[:d]).reshape(d, 1, 1), AXES)


def seed_sharded(mesh: Mesh) -> NamedSharding:
  """A leaf's leading (seed) axis split over all devices of the mesh, the rest whole."""
  return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))


def state_sharding(state, mesh: Mesh, min_size: int = FSDP_MIN_SIZE, split=None):
  """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs).

  Tensor parallelism: split(key path tuple, shape) -> the dimension of a leaf split over the
  "model" axis, or None (e.g. lm.model.tensor_parallel_dim); without split, or on a model axis of
  1, nothing is. FSDP: a leaf of at least min_size elements is split over the "fsdp" axis along
  its largest other dimension that the axis size divides; a large leaf the model axis does not
  split (an embedding) is split over fsdp and model together where its dimension allows, so no
  large leaf is whole on every device of a model group. Smaller leaves (biases, norms, step, key)
  are replicated, since splitting them saves little memory and costs a gather each.
  """
  n, m = mesh.shape[FSDP_AXIS], mesh.shape.get(MODEL_AXIS, 1)

  def largest(shape, ways, skip=None):
    dims = [d for d in range(len(shape)) if d != skip and shape[d] % ways == 0]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None

  def rule(path, x):
    shape, spec = tuple(x.shape), [None] * len(x.shape)
    tp = None if split is None or m == 1 else split(path_keys(path), shape)
    if tp is not None:
      if shape[tp] % m:
        raise ValueError(f"{jax.tree_util.keystr(path)} {shape}: dim {tp} does not split {m} ways")
      spec[tp] = MODEL_AXIS
    if int(np.prod(shape, dtype=np.int64)) < min_size:
      return NamedSharding(mesh, P(*spec))
    both = None if tp is not None or m == 1 else largest(shape, n * m)
    if both is not None:
      spec[both] = (FSDP_AXIS, MODEL_AXIS) if n > 1 else MODEL_AXIS
    elif n > 1 and largest(shape, n, tp) is not None:
      spec[largest(shape, n, tp)] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(rule, state)


def path_keys(path) -> tuple:
  """A tree path as the tuple of its dict keys and sequence indices (attribute steps as None),
  e.g. ("blocks", 0, "qkv", "kernel")."""
  return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def check_batch_size(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
  """A batch splits over the mesh's devices, and into micro_batches parts that each do (else a
  UserError naming the setting)."""
  n = batch_devices(mesh)
  if batch_size < 1 or batch_size % n:
    raise UserError(
      f"batch_size {batch_size} must be a positive multiple of the {n} data-parallel devices"
    )
  if micro_batches < 1 or batch_size % (micro_batches * n):
    raise UserError(
      f"micro_batches {micro_batches} must divide batch_size {batch_size} into parts that are "
      f"multiples of the {n} data-parallel devices"
    )


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def pool_rows(num_rows: int, mesh: Mesh, process: int | None = None) -> tuple[np.ndarray, int]:
  """Which rows of a sampling pool of num_rows sequences a process supplies (this one by default).

  Returns (the global indices of the process's rows [R], ascending, in the order put_pool takes
  them; the padded row count). Indices >= num_rows are padding rows, which come last.
  """
  if num_rows < 1:
    raise UserError("the sampling pool is empty")
  process = jax.process_index() if process is None else process
  n = mesh.devices.size
  padded = -(-num_rows // n) * n
  slices = batch_sharded(mesh).devices_indices_map((padded,))
  spans = sorted(
    {
      (s[0].start or 0, padded if s[0].stop is None else s[0].stop)
      for d, s in slices.items()
      if d.process_index == process
    }
  )
  return np.concatenate([np.arange(a, b) for a, b in spans]), padded


def put_pool(local: dict, num_rows: int, mesh: Mesh) -> dict:
  """The global sampling pool, split over the mesh, built from this process's rows only.

  local: every leaf [R_real, ...], the real rows (< num_rows) of pool_rows(num_rows, mesh) in that
  order; zero padding rows are appended here. Returns leaves [padded, ...]
  (jax.make_array_from_process_local_data): no process ever holds the whole pool.
  """
  rows, padded = pool_rows(num_rows, mesh)
  real = int((rows < num_rows).sum())
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] != real:
      raise ValueError(f"put_pool: {x.shape[0]} local rows, this process supplies {real}")
    x = np.concatenate([x, np.zeros((len(rows) - real, *x.shape[1:]), x.dtype)])
    return jax.make_array_from_process_local_data(sharding, x, (padded, *x.shape[1:]))

  return jax.tree.map(put, local)


def shard_pool(data: dict, mesh: Mesh) -> dict:
  """put_pool for a pool every process holds whole on the host ([N, ...] leaves)."""
  num_rows = len(jax.tree.leaves(data)[0])
  rows, _ = pool_rows(num_rows, mesh)
  real = rows[rows < num_rows]
  return put_pool(jax.tree.map(lambda x: np.asarray(x)[real], data), num_rows, mesh)
