"""Causal self-attention through the Pallas splash-attention kernel (TPU).

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a blockwise flash
attention with an online softmax: the scores are never materialised, so its memory grows as T,
and blocks above the diagonal are skipped. It runs compiled on TPUs; on other backends it runs
in Pallas's interpret mode (correct, slow: for tests), which is how the CPU tests check it
against the plain attention. Grouped-query attention without repeating K/V: each key/value head
runs one multi-query kernel over its group of query heads.

Over a mesh: the kernel is one opaque call to XLA's partitioner, which would gather its inputs
onto every device. So under a context mesh (jax.set_mesh; iwsft's train step sets its own) the
kernel runs in a shard_map: each device attends over its own rows (split over the mesh's "data"
and "fsdp" axes) and, where the "model" axis divides both head counts, its own heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from iwsft.core.sharding import DATA_AXIS, FSDP_AXIS, MODEL_AXIS

LANE = 128  # the kernel's sequence blocks are multiples of this
MAX_BLOCK = 512


def _block(t: int) -> int:
  """The sequence block for T tokens: up to MAX_BLOCK, a multiple of LANE."""
  return min(MAX_BLOCK, -(-t // LANE) * LANE)


@functools.lru_cache(maxsize=32)
def _kernel(group: int, length: int, block: int, interpret: bool, mesh):
  """The multi-query kernel for `group` query heads over a padded length (a multiple of block).
  Its block tables are arrays of the mesh context they were made in (inside a shard_map: its
  manual axes), so each context (`mesh`, JAX's abstract mesh) gets its own kernel."""
  mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(group)])
  sizes = kernels.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block,
    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
    block_q_dq=block, block_kv_dq=block,
  )  # fmt: skip
  with jax.ensure_compile_time_eval():  # its block tables are constants, not a trace's values
    return kernels.make_splash_mqa(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _partition(b: int, h: int, kv: int):
  """The context mesh's split of [B, heads, ...] inputs: (mesh, batch axes, head axis), or None
  where there is no mesh (or nothing of it divides the rows)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free = [a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1]
  rows = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in free)
  if rows and b % int(np.prod([mesh.shape[a] for a in rows])):
    rows = ()
  heads = MODEL_AXIS if MODEL_AXIS in free and h % mesh.shape[MODEL_AXIS] == 0 else None
  if heads and kv % mesh.shape[MODEL_AXIS]:
    heads = None
  return (mesh, rows or None, heads) if rows or heads else None


def splash_attention(q, k, v, segments=None):
  """q [B,H,T,D], k/v [B,K,T,D] (H = K · G), segments [B,T] int or None -> [B,H,T,D].

  Causal; with segments a token attends only to earlier tokens of its own segment. Query head h
  attends with key/value head h // G, as the plain attention does. Under a context mesh each
  device runs the kernel on its own rows and heads (_partition)."""
  split = _partition(q.shape[0], q.shape[1], k.shape[1])
  if split is None:
    return _splash(q, k, v, segments)
  mesh, rows, heads = split
  spec = P(rows, heads)
  attend = jax.shard_map(
    _splash,
    mesh=mesh,
    in_specs=(spec, spec, spec, None if segments is None else P(rows)),
    out_specs=spec,
    check_vma=False,  # the Pallas call carries no varying-axes annotations
  )
  return attend(q, k, v, segments)


def _splash(q, k, v, segments):
  """splash_attention on one device's rows and heads."""
  b, h, t, d = q.shape
  kv = k.shape[1]
  block = _block(t)
  length = -(-t // block) * block
  pad = [(0, 0), (0, 0), (0, length - t), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q * np.asarray(d**-0.5, q.dtype), k, v))
  interpret = jax.default_backend() != "tpu"
  kernel = _kernel(h // kv, length, block, interpret, jax.sharding.get_abstract_mesh())
  qg = q.reshape(b, kv, h // kv, length, d)
  if segments is None:  # padded keys come after every real query: the causal mask hides them
    out = jax.vmap(jax.vmap(kernel))(qg, k, v)
  else:  # padding is a segment of its own (-1)
    ids = jnp.pad(segments.astype(jnp.int32), [(0, 0), (0, length - t)], constant_values=-1)

    def one(qh, kh, vh, seg):  # qh [G, L, D], kh/vh [L, D], seg [L]
      return kernel(qh, kh, vh, segment_ids=kernels.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, k, v, ids)
  return out.reshape(b, h, length, d)[:, :, :t].astype(v.dtype)
