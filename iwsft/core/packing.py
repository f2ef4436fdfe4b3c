"""Packed sequence batches: the real steps of the batch's distinct sequences laid end to end.

For a model whose step log-probs depend only on that step's own inputs (a Markov policy,
log π(a_t | s_t)), a batch of B sequences padded to T steps needs the model only at the K real
steps of its distinct sequences (a sequence drawn twice, as curation's oversampling does, has the
same log-probs in both rows). A packed batch computes them over a fixed capacity of C slots
(K ≤ C ≪ B·T for episodes of mixed lengths) and puts the values back at their [B, T] places, zeros
elsewhere, so the objective sees exactly the padded batch's inputs: the same sequences, the same
per-step values (up to float rounding), the same loss and gradient. A batch whose K exceeds C is
computed padded instead (core.step), so results never depend on C; C only decides how often that
happens.

Layout of a packed batch: the per-sequence leaves [B, ...] and the rank-2 per-step leaves (mask,
logp_ref) [B, T] as in a padded batch, plus PACKED: {each per-step leaf [C, 1, ...], "row" [C],
"pos" [C], "valid" [C], "inverse" [B]}: slot c holds step pos[c] of distinct sequence row[c] when
valid[c] is 1, and batch row b is distinct sequence inverse[b].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PACKED = "packed"


def is_step_leaf(x, n: int, t: int) -> bool:
  """Whether a pool leaf holds one entry per step ([N, T, ...]) rather than per sequence."""
  return x.ndim >= 2 and x.shape[:2] == (n, t)


def plan(lengths: jax.Array, capacity: int) -> dict[str, jax.Array]:
  """Slots of the steps of sequences with these lengths [B] (int), end to end in C = capacity
  slots -> {"row", "pos", "valid"}, each [C]; steps beyond C are left out (valid counts only
  slots before the total)."""
  ends = jnp.cumsum(lengths)
  slot = jnp.arange(capacity, dtype=ends.dtype)
  row = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), lengths.shape[0] - 1)
  pos = slot - (ends[row] - lengths[row])
  valid = slot < ends[-1]
  return {"row": row, "pos": jnp.where(valid, pos, 0), "valid": valid.astype(jnp.float32)}


def distinct(idx: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The distinct sequences of a batch idx [B] of a pool with these lengths [N] -> (their indices
  [B], padded with N; their lengths [B], 0 for padding; inverse [B]: row b is distinct
  inverse[b])."""
  n = lengths.shape[0]
  uniq, inverse = jnp.unique(idx, size=idx.shape[0], fill_value=n, return_inverse=True)
  return uniq, jnp.concatenate([lengths, jnp.zeros(1, lengths.dtype)])[uniq], inverse.reshape(-1)


def distinct_steps(idx: jax.Array, lengths: jax.Array) -> jax.Array:
  """Real steps of the distinct sequences of a batch idx [B]: what a packed batch holds."""
  return distinct(idx, lengths)[1].sum()


def gather_packed(data: dict, idx: jax.Array, lengths: jax.Array, capacity: int) -> dict:
  """The packed batch of sequences idx [B] of a pool (leaves [N, T, ...] or [N, ...]) whose
  sequence lengths are lengths [N]."""
  n, t = data["mask"].shape
  uniq, uniq_lengths, inverse = distinct(idx, lengths)
  slots = plan(uniq_lengths, capacity)
  seq, pos = jnp.minimum(uniq[slots["row"]], n - 1), slots["pos"]
  batch, packed = {}, {**slots, "inverse": inverse}
  for k, x in data.items():
    if not is_step_leaf(x, n, t):
      batch[k] = x[idx]
      continue
    packed[k] = x[seq, pos][:, None]
    if x.ndim == 2:  # a scalar per step (mask, logp_ref): cheap to keep in the padded layout too
      batch[k] = x[idx]
  batch[PACKED] = packed
  return batch


def unpack(values: jax.Array, packed: dict, shape: tuple[int, int]) -> jax.Array:
  """Per-slot values [C] -> [B, T] at their rows' steps, 0 at padding (gradients flow)."""
  per_distinct = jnp.zeros(shape, values.dtype).at[packed["row"], packed["pos"]]
  return per_distinct.add(values * packed["valid"])[packed["inverse"]]


def markov_logprob(logprob_fn):
  """A `logprob_fn(params, batch) -> [B, T]` that also takes packed batches, for a model whose
  step log-probs depend on that step's inputs only: it runs on the C packed steps (as C sequences
  of length 1) and unpacks. Padded batches go to logprob_fn unchanged."""

  def fn(params, batch):
    if PACKED not in batch:
      return logprob_fn(params, batch)
    packed = batch[PACKED]
    steps = {k: v for k, v in packed.items() if k not in ("row", "pos", "valid", "inverse")}
    return unpack(logprob_fn(params, steps)[:, 0], packed, batch["mask"].shape)

  return fn


def capacity(
  lengths: np.ndarray,
  logits: np.ndarray,
  batch_size: int,
  seeds: int = 1,
  quantile: float = 0.99,
  multiple: int = 64,
  draws: int = 4000,
) -> int | None:
  """Slots C such that the distinct sequences of a batch of batch_size drawn ∝ exp(logits) [N]
  from sequences of these lengths [N] fit, in all `seeds` batches of a step at once, with
  probability `quantile` (estimated from `draws` simulated steps, with a fixed seed: the same C on
  every process). A multiple of `multiple`; None when packing would save less than a tenth of the
  padded B·T."""
  lengths = np.asarray(lengths, np.int64)
  p = np.exp(logits - np.max(logits))
  p = p / p.sum()
  rng = np.random.default_rng(0)
  idx = np.sort(rng.choice(len(lengths), size=(draws, seeds, batch_size), p=p), axis=-1)
  first = np.concatenate([np.ones_like(idx[..., :1], bool), idx[..., 1:] != idx[..., :-1]], -1)
  totals = (lengths[idx] * first).sum(axis=-1).max(axis=-1)
  c = int(-(-np.quantile(totals, quantile, method="higher") // multiple) * multiple)
  padded = batch_size * int(lengths.max())
  return c if c <= 0.9 * padded else None
