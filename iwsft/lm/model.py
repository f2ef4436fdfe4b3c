"""A small decoder-only transformer in Flax NNX (after nanodo), with an explicit KV cache.

Pre-norm blocks: x + Attn(RMSNorm(x)), x + MLP(RMSNorm(x)); learned absolute positions; GELU MLP;
output projection tied to the token embedding by default. The KV cache is a plain dict of arrays
passed in and out (k, v: [layers, B, heads, max_len, head_dim]), so decoding stays a pure function.
Learned positions make the cache trivially correct: a token's key depends only on its position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from iwsft.lm.tokenizer import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = VOCAB_SIZE
  d_model: int = 64
  n_layers: int = 3
  n_heads: int = 4
  d_ff: int = 256
  max_len: int = 64
  tie_embeddings: bool = True

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def _attend(q, k, v, mask):
  """q [B,H,Tq,D], k/v [B,H,Tk,D], mask [B or 1, 1, Tq, Tk] bool -> [B,H,Tq,D]."""
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, cfg.d_ff, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(cfg.d_ff, d, use_bias=False, rngs=rngs)

  def _heads(self, x):
    b, t, _ = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    shape = (b, t, self.cfg.n_heads, self.cfg.head_dim)
    return [y.reshape(shape).transpose(0, 2, 1, 3) for y in (q, k, v)]

  def _finish(self, x, att):
    b, _, t, _ = att.shape
    x = x + self.proj(att.transpose(0, 2, 1, 3).reshape(b, t, self.cfg.d_model))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  def __call__(self, x, mask):
    """Full-sequence pass: x [B,T,d] -> (x, (k, v)) with k, v [B,H,T,D] for a cache."""
    q, k, v = self._heads(x)
    return self._finish(x, _attend(q, k, v, mask)), (k, v)

  def decode(self, x, k_cache, v_cache, pos):
    """One token: x [B,1,d], caches [B,H,L,D], pos scalar -> (x, k_cache, v_cache)."""
    q, k, v = self._heads(x)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=2)
    mask = (jnp.arange(k_cache.shape[2]) <= pos)[None, None, None, :]
    return self._finish(x, _attend(q, k_cache, v_cache, mask)), k_cache, v_cache


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, vocab] (causal)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

  def _logits(self, x):
    x = self.norm(x)
    return self.embed.attend(x) if self.cfg.tie_embeddings else self.unembed(x)

  def __call__(self, tokens):
    logits, _ = self.prefill(tokens)
    return logits

  def prefill(self, tokens):
    """tokens [B, T] -> (logits [B, T, V], cache) with the cache holding positions < T."""
    b, t = tokens.shape
    x = self.embed(tokens) + self.pos[...][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    ks, vs = [], []
    for block in self.blocks:
      x, (k, v) = block(x, mask)
      ks.append(k)
      vs.append(v)
    pad = [(0, 0), (0, 0), (0, 0), (0, self.cfg.max_len - t), (0, 0)]
    cache = {"k": jnp.pad(jnp.stack(ks), pad), "v": jnp.pad(jnp.stack(vs), pad)}
    return self._logits(x), cache

  def decode(self, token, cache, pos):
    """token [B] at position pos (scalar) -> (logits [B, V], cache with pos filled)."""
    x = self.embed(token[:, None]) + jax.lax.dynamic_slice_in_dim(self.pos[...], pos, 1)[None]
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block.decode(x, cache["k"][i], cache["v"][i], pos)
      ks.append(k)
      vs.append(v)
    return self._logits(x)[:, 0], {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def token_logprobs(model: Transformer, tokens):
  """tokens [B, T] -> [B, T]: entry t is log p(tokens[t] | tokens[<t]); entry 0 is 0."""
  logp = jax.nn.log_softmax(model(tokens[:, :-1]).astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def make_logprob_fn(graphdef):
  """The LM's `logprob_fn(params, batch) -> [B, T]` for the shared update step (batch["tokens"])."""

  def logprob_fn(params, batch):
    return token_logprobs(nnx.merge(graphdef, params), batch["tokens"])

  return logprob_fn


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
