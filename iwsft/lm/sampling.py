"""Batched sampling with a KV cache: prefill the prompt once, then one token per step in lax.scan.

Prompts in one call share a length (the caller groups them); completions stop at EOS and are
padded with PAD after it. temperature 0 is greedy decoding; top_k 0 keeps the whole vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iwsft.lm.tokenizer import BOS, EOS, PAD

SPECIAL = (BOS, EOS, PAD)  # (bos, eos, pad) of the byte tokenizer; a pretrained one has its own


def _pick(key, logits, temperature: float, top_k: int, special=SPECIAL):
  """logits [B, V] -> token ids [B]; BOS and PAD (unless it is EOS) are never generated."""
  bos, eos, pad = special
  banned = [t for t in (bos, pad) if t is not None and t != eos]
  if banned:
    logits = logits.at[:, jnp.array(banned)].set(-jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def generate(
  graphdef,
  params,
  prompts,
  key,
  max_new: int,
  temperature: float = 1.0,
  top_k: int = 0,
  special=SPECIAL,
):
  """prompts [B, P] int32 -> completions [B, max_new] (EOS, then PAD); special = (bos, eos, pad)."""
  _, eos, pad = special
  model = nnx.merge(graphdef, params)
  b, p = prompts.shape
  if p + max_new > model.cfg.max_len:
    raise ValueError(f"prompt {p} + {max_new} new tokens exceed the context of {model.cfg.max_len}")
  logits, cache = model.prefill(prompts)
  key, sub = jax.random.split(key)
  first = _pick(sub, logits[:, -1].astype(jnp.float32), temperature, top_k, special)

  def step(carry, _):
    token, cache, pos, done, key = carry
    out = jnp.where(done, pad, token)
    done = done | (token == eos)
    logits, cache = model.decode(token, cache, pos)
    key, sub = jax.random.split(key)
    nxt = _pick(sub, logits.astype(jnp.float32), temperature, top_k, special)
    return (nxt, cache, pos + 1, done, key), out

  init = (first, cache, jnp.int32(p), jnp.zeros(b, bool), key)
  _, out = jax.lax.scan(step, init, None, length=max_new)
  return out.T


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def generate_without_cache(
  graphdef,
  params,
  prompts,
  key,
  max_new: int,
  temperature: float = 1.0,
  top_k: int = 0,
  special=SPECIAL,
):
  """The same distribution as `generate`, recomputing the whole prefix every step (for checks
  and the benchmark of what the cache saves)."""
  model = nnx.merge(graphdef, params)
  b, p = prompts.shape
  _, eos, pad = special
  buf = jnp.concatenate([prompts, jnp.full((b, max_new), pad, prompts.dtype)], axis=1)

  def step(carry, i):
    buf, done, key = carry
    logits = model(buf)  # causal: positions after p + i do not affect position p + i - 1
    key, sub = jax.random.split(key)
    token = _pick(
      sub,
      jax.lax.dynamic_index_in_dim(logits, p + i - 1, 1, keepdims=False).astype(jnp.float32),
      temperature,
      top_k,
      special,
    )
    out = jnp.where(done, pad, token)
    done = done | (token == eos)
    buf = jax.lax.dynamic_update_index_in_dim(buf, out.astype(buf.dtype), p + i, 1)
    return (buf, done, key), out

  _, out = jax.lax.scan(step, (buf, jnp.zeros(b, bool), key), jnp.arange(max_new))
  return out.T


def sample_grouped(
  graphdef,
  params,
  prompts: list[list[int]],
  key,
  max_new: int,
  temperature: float,
  top_k: int = 0,
  batch_size: int = 256,
  special=SPECIAL,
) -> list[np.ndarray]:
  """Prompts of any lengths -> one completion array per prompt, in order.

  Prompts are grouped by length and sampled batch_size at a time (the last batch padded to a full
  one so that each group compiles once).
  """
  out: list[np.ndarray | None] = [None] * len(prompts)
  by_len: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    by_len.setdefault(len(p), []).append(i)
  for _, idx in sorted(by_len.items()):
    for start in range(0, len(idx), batch_size):
      chunk = idx[start : start + batch_size]
      arr = np.array([prompts[i] for i in chunk], np.int32)
      if len(chunk) < batch_size and len(idx) > batch_size:
        arr = np.concatenate([arr, np.repeat(arr[-1:], batch_size - len(chunk), 0)])
      key, sub = jax.random.split(key)
      res = np.asarray(
        generate(graphdef, params, jnp.asarray(arr), sub, max_new, temperature, top_k, special)
      )
      for j, i in enumerate(chunk):
        out[i] = res[j]
  return out
