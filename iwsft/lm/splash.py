"""Causal self-attention through the Pallas splash-attention kernel (TPU).

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a blockwise flash
attention with an online softmax: the scores are never materialised, so its memory grows as T,
and blocks above the diagonal are skipped. It runs compiled on TPUs; on other backends it runs
in Pallas's interpret mode (correct, slow: for tests), which is how the CPU tests check it
against the plain attention. Grouped-query attention without repeating K/V: each key/value head
runs one multi-query kernel over its group of query heads. One device so far: the kernel is one
opaque call to XLA's partitioner, so under a batch-sharded mesh XLA gathers its inputs onto
every device (correct, measured on 8 forced CPU devices, but no saving); a shard_map over the
mesh would split it, and is not built (the settings refuse splash on more than one device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

LANE = 128  # the kernel's sequence blocks are multiples of this
MAX_BLOCK = 512


def _block(t: int) -> int:
  """The sequence block for T tokens: up to MAX_BLOCK, a multiple of LANE."""
  return min(MAX_BLOCK, -(-t // LANE) * LANE)


@functools.lru_cache(maxsize=32)
def _kernel(group: int, length: int, block: int, interpret: bool):
  """The multi-query kernel for `group` query heads over a padded length (a multiple of block)."""
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


def splash_attention(q, k, v, segments=None):
  """q [B,H,T,D], k/v [B,K,T,D] (H = K · G), segments [B,T] int or None -> [B,H,T,D].

  Causal; with segments a token attends only to earlier tokens of its own segment. Query head h
  attends with key/value head h // G, as the plain attention does."""
  b, h, t, d = q.shape
  kv = k.shape[1]
  block = _block(t)
  length = -(-t // block) * block
  pad = [(0, 0), (0, 0), (0, length - t), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q * np.asarray(d**-0.5, q.dtype), k, v))
  kernel = _kernel(h // kv, length, block, jax.default_backend() != "tpu")
  qg = q.reshape(b, kv, h // kv, length, d)
  if segments is None:  # padded keys come after every real query: the causal mask hides them
    out = jax.vmap(jax.vmap(kernel))(qg, k, v)
  else:  # padding is a segment of its own (-1)
    ids = jnp.pad(segments.astype(jnp.int32), [(0, 0), (0, length - t)], constant_values=-1)

    def one(qh, kh, vh, seg):  # qh [G, L, D], kh/vh [L, D], seg [L]
      return kernel(qh, kh, vh, segment_ids=kernels.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, k, v, ids)
  return out.reshape(b, h, length, d)[:, :, :t].astype(v.dtype)
