"""Packed SFT batches for the LM: a batch's sequences laid end to end in fewer rows.

A batch of B sequences padded to the context T spends most of its compute on padding when
completions vary in length. Packed, sequence b (its prompt and completion, lengths[b] tokens)
sits in row row[b] from column offset[b] of R rows of T tokens, in order, each starting a new row
when it does not fit in the current one. The model sees segment ids (b + 1; 0 for padding):
positions restart at every segment and no token attends across segments
(model.Transformer.hidden), so every token's log-prob is the padded batch's. The log-probs are put
back at their [B, T] places (unpack), and the objective sees exactly the padded batch: the same
per-sequence weights (each segment's log-ratio summed or averaged within it), the same loss and
gradients, for every objective mode and reduction. A batch that does not fit in R rows is computed
padded (both are compiled; lax.cond picks one per batch), so results never depend on R.

On several data-parallel devices the batch's rows are split over them in contiguous blocks;
packed in `groups` blocks (one per device), each block's sequences fill rows of their own, so no
sequence moves to another device to be packed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lengths_of(mask: jax.Array) -> jax.Array:
  """mask [B, T] of completion tokens (after a left-aligned prompt) -> [B] int32: each row's
  tokens up to its last completion token (0 for a row without one)."""
  t = jnp.arange(mask.shape[1])
  return jnp.max(jnp.where(mask > 0, t + 1, 0), axis=1).astype(jnp.int32)


def plan(lengths: jax.Array, rows: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """lengths [B] -> (row [B], offset [B], fits): sequences placed in order, each at the end of
  the current row if it fits in `width`, else at the start of the next; fits: every sequence
  lies within `rows` rows."""

  def place(carry, n):
    r, used = carry
    wrap = used + n > width
    r, used = jnp.where(wrap, r + 1, r), jnp.where(wrap, 0, used)
    return (r, used + n), (r, used)

  (last, _), (row, offset) = jax.lax.scan(place, (jnp.int32(0), jnp.int32(0)), lengths)
  return row, offset, (last < rows) & jnp.all(lengths <= width)


def pack(tokens: jax.Array, lengths, row, offset, rows: int) -> tuple[jax.Array, ...]:
  """tokens [B, T] -> (packed tokens [rows, T], segments [rows, T]: b + 1 where sequence b lies,
  0 elsewhere)."""
  b, t = tokens.shape
  col = jnp.arange(t)[None]
  dest_col = jnp.where(col < lengths[:, None], offset[:, None] + col, t)  # t: dropped
  dest_row = jnp.broadcast_to(row[:, None], (b, t))
  out = jnp.zeros((rows, t), tokens.dtype).at[dest_row, dest_col].set(tokens, mode="drop")
  seg = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.int32)[:, None], (b, t))
  segments = jnp.zeros((rows, t), jnp.int32).at[dest_row, dest_col].set(seg, mode="drop")
  return out, segments


def unpack(values: jax.Array, lengths, row, offset) -> jax.Array:
  """values [rows, T] of a packed batch -> [B, T] at each sequence's own places; 0 at its first
  token (nothing predicts it) and past its length."""
  t = values.shape[1]
  col = jnp.arange(t)[None]
  src = jnp.minimum(offset[:, None] + col, t - 1)
  picked = values[row[:, None], src]
  return jnp.where((col > 0) & (col < lengths[:, None]), picked, 0.0)


def packed_logprobs(logprob_rows, tokens: jax.Array, mask: jax.Array, rows: int, groups: int = 1):
  """[B, T] token log-probs of a batch, computed on `rows` packed rows when its sequences fit.

  logprob_rows(tokens [N, T], segments [N, T] or None) -> [N, T] log-probs (entry t that of
  token t given the earlier tokens of its segment). groups: the batch's contiguous blocks of
  B / groups sequences are packed each into rows / groups rows (the data-parallel devices'
  shards, kept on their devices); the batch is computed padded unless every block fits."""
  (b, t), g = tokens.shape, groups
  if b % g or rows % g:
    raise ValueError(f"packing groups {g} must divide the batch {b} and the packed rows {rows}")
  lengths = lengths_of(mask).reshape(g, b // g)
  row, offset, fits = jax.vmap(plan, in_axes=(0, None, None))(lengths, rows // g, t)

  def packed(_):
    pack_group = jax.vmap(pack, in_axes=(0, 0, 0, 0, None))
    p_tokens, segments = pack_group(tokens.reshape(g, b // g, t), lengths, row, offset, rows // g)
    values = logprob_rows(p_tokens.reshape(rows, t), segments.reshape(rows, t))
    return jax.vmap(unpack)(values.reshape(g, rows // g, t), lengths, row, offset).reshape(b, t)

  return jax.lax.cond(jnp.all(fits), packed, lambda _: logprob_rows(tokens, None), None)
