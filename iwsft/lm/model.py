"""A Llama-family decoder in Flax NNX, with an explicit KV cache; the pipeline's small model is a
config of it.

Pre-norm blocks: x + Attn(RMSNorm(x)), x + MLP(RMSNorm(x)). Positions are learned absolute
embeddings (the small byte-level model) or rotary (RoPE, rotate-half convention, as Hugging Face's
Llama and Qwen2); the MLP is GELU or SwiGLU; attention is grouped-query (n_kv_heads key/value
heads shared by n_heads query heads), with optional q/k/v biases (Qwen2); the output projection is
tied to the token embedding or not. q, k and v come from one fused matrix [d, (H + 2K) · Dh], and
SwiGLU's gate and up projections from one [d, 2 · d_ff], so large leaves stay few (FSDP splits
them). Their columns are grouped so that any contiguous split of them is whole heads and whole
MLP units (tensor parallelism, `tensor_parallel_dim`): qkv's are [K, G + 2, Dh] (each key/value
head's G query heads, then its key, then its value; G = H / K), up's [d_ff, 2] (each unit's gate
and up). Hugging Face's separate projections are these columns reordered (lm/checkpoints.py).
The KV cache is a plain dict of arrays passed in and out (k, v: [layers, B, K, cache_len,
Dh]), so decoding stays a pure function. `param_dtype` is the parameters' type (float32 or
bfloat16), `dtype` the compute type.

For long sequences (compute settings: the same function, less memory): attention "chunked" takes
the queries `attention_chunk` at a time, each chunk's scores [chunk, T] recomputed in the backward
pass instead of kept, so its memory grows linearly in T, not as T²; "dot_product" is
jax.nn.dot_product_attention with the implementation left to JAX (which, in jax 0.10 and 0.11,
is always XLA's: the scores are materialised), "cudnn" the same with cuDNN's fused kernel
(GPUs only; unpacked rows), "splash" the Pallas splash-attention kernel (TPUs; lm/splash.py).
`remat` recomputes each block's activations in the backward pass ("full"; "dots" keeps the
matrix products). A `logits_chunk` computes the token log-probs that many positions at a
time, so the float32 logits [B, T, V] are never whole.

`scan_layers` stacks the blocks: `blocks` is one Block whose every leaf has a leading layer axis
(`blocks/qkv/kernel` [n_layers, d, ...] instead of `blocks/<i>/qkv/kernel`), run by one
`jax.lax.scan`, so one block is compiled whatever the depth (compile time and program size flat
in n_layers; with remat, one block's temporaries). It is a parameter layout, not only a way to
compute: at the same seed the stacked model's leaves are the per-layer model's stacked
(`stack_blocks`), checkpoints load and export in Hugging Face's per-layer tensors either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iwsft.core import objectives
from iwsft.core.sharding import path_keys
from iwsft.errors import UserError
from iwsft.lm import packing
from iwsft.lm.splash import splash_attention
from iwsft.lm.tokenizer import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = VOCAB_SIZE
  d_model: int = 64
  n_layers: int = 3
  n_heads: int = 4
  d_ff: int = 256
  max_len: int = 64  # the context: learned positions and the KV cache have this many slots
  tie_embeddings: bool = True
  n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: n_heads
  positions: str = "learned"  # "learned" (absolute) or "rope"
  rope_theta: float = 10_000.0
  mlp: str = "gelu"  # "gelu" or "swiglu"
  qkv_bias: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute type: "float32" or "bfloat16"
  param_dtype: str = "float32"  # the parameters' type: "float32" or "bfloat16"
  attention: str = "full"  # one of ATTENTION (see the module's docstring)
  attention_chunk: int = 512  # queries per chunk of "chunked" attention
  remat: str = "none"  # recompute each block in the backward pass: "none", "full", "dots"
  logits_chunk: int = 0  # token log-probs this many positions at a time; 0: all at once
  lora_rank: int = 0  # low-rank adapters beside the lora_targets projections; 0: none
  lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
  lora_targets: tuple[str, ...] = ("qkv", "proj", "up", "down")
  scan_layers: bool = False  # blocks stacked ([n_layers, ...] leaves) and run by one lax.scan

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.kv_heads}")
    for name, value, allowed in (
      ("positions", self.positions, ("learned", "rope")),
      ("mlp", self.mlp, ("gelu", "swiglu")),
      ("dtype", self.dtype, ("float32", "bfloat16")),
      ("param_dtype", self.param_dtype, ("float32", "bfloat16")),
      ("attention", self.attention, ATTENTION),
      ("remat", self.remat, tuple(REMAT)),
    ):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if self.attention_chunk < 1 or self.logits_chunk < 0:
      raise ValueError("attention_chunk must be >= 1 and logits_chunk >= 0")
    if self.lora_rank < 0 or not set(self.lora_targets) <= set(LORA_TARGETS):
      raise ValueError(f"lora_rank must be >= 0 and lora_targets of {LORA_TARGETS}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads


# What the parameters' layout is (recorded in each run's identity, so a run saved in another
# layout is refused rather than read wrongly): 2 = qkv and up grouped (tensor_parallel_dim).
PARAM_LAYOUT = 2
ATTENTION = ("full", "chunked", "dot_product", "cudnn", "splash")
# jax.nn.dot_product_attention's implementation for each attention setting that uses it
DOT_PRODUCT = {"dot_product": None, "cudnn": "cudnn"}
LORA_TARGETS = ("qkv", "proj", "up", "down")  # a block's projections
REMAT = {  # jax.checkpoint policies: what a rematerialised block keeps for the backward pass
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _attend(q, k, v, mask):
  """q [B,H,Tq,D], k/v [B,K,Tk,D] (H = K · G), mask [B or 1, 1, Tq, Tk] bool -> [B,H,Tq,D].

  Query head h attends with key/value head h // G (Hugging Face's repeat_kv order)."""
  b, h, tq, d = q.shape
  kv = k.shape[1]
  qg = q.reshape(b, kv, h // kv, tq, d)
  scores = jnp.einsum("bkgqd,bktd->bkgqt", qg, k).astype(jnp.float32) / jnp.sqrt(d)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqt,bktd->bkgqd", probs, v).reshape(b, h, tq, d)


def _attend_causal(q, k, v, cfg: LMConfig, segments=None):
  """Causal self-attention over a whole sequence, as cfg.attention says: q [B,H,T,D], k/v
  [B,K,T,D] -> [B,H,T,D]; every implementation equals _attend with a causal mask. segments
  [B, T] (packed rows): a token attends only to earlier tokens of its own segment."""
  t = q.shape[2]

  def causal(rows):  # [B or 1, 1, len(rows), T]
    m = (rows[:, None] >= jnp.arange(t)[None])[None, None]
    if segments is None:
      return m
    return m & (segments[:, rows][:, None, :, None] == segments[:, None, None, :])

  if cfg.attention in ("dot_product", "cudnn"):
    swap = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, heads, D], its layout
    attend = functools.partial(
      jax.nn.dot_product_attention, implementation=DOT_PRODUCT[cfg.attention]
    )
    if segments is None:
      return swap(attend(swap(q), swap(k), swap(v), is_causal=True))
    return swap(attend(swap(q), swap(k), swap(v), mask=causal(jnp.arange(t))))
  if cfg.attention == "splash":
    return splash_attention(q, k, v, segments)
  if cfg.attention == "full" or t <= cfg.attention_chunk:
    return _attend(q, k, v, causal(jnp.arange(t)))
  c = cfg.attention_chunk
  n = -(-t // c)
  qs = jnp.pad(q, [(0, 0), (0, 0), (0, n * c - t), (0, 0)])
  qs = qs.reshape(*q.shape[:2], n, c, q.shape[-1]).transpose(2, 0, 1, 3, 4)  # [n, B, H, c, D]

  @jax.checkpoint  # the chunk's scores are recomputed in the backward pass, never all kept
  def chunk(args):
    i, qc = args
    return _attend(qc, k, v, causal(jnp.minimum(i * c + jnp.arange(c), t - 1)))

  out = jax.lax.map(chunk, (jnp.arange(n), qs))  # [n, B, H, c, D]
  return out.transpose(1, 2, 0, 3, 4).reshape(*q.shape[:2], n * c, q.shape[-1])[:, :, :t]


def rope(x, positions, theta: float):
  """Rotary embedding, rotate-half convention: x [B, H, T, D], positions [T] or [B, T] ->
  [B, H, T, D]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [T or B x T, D/2]
  if positions.ndim == 2:
    angles = angles[:, None]  # [B, 1, T, D/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dh, dtype = cfg.d_model, cfg.head_dim, jnp.dtype(cfg.dtype)
    kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    dense = lambda i, o, bias=False: nnx.Linear(i, o, use_bias=bias, **kw)
    norm = lambda: nnx.RMSNorm(d, epsilon=cfg.norm_eps, **kw)
    self.norm1 = norm()
    self.qkv = dense(d, (cfg.n_heads + 2 * cfg.kv_heads) * dh, cfg.qkv_bias)
    self.proj = dense(cfg.n_heads * dh, d)
    self.norm2 = norm()
    self.up = dense(d, (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff)
    self.down = dense(cfg.d_ff, d)
    # drawn as [q | k | v] and [gate | up] columns, then grouped: the same function at init
    self.qkv.kernel.value = self.qkv.kernel[...][:, qkv_columns(cfg)]
    self.up.kernel.value = self.up.kernel[...][:, up_columns(cfg)]
    for name in cfg.lora_targets if cfg.lora_rank else ():  # B starts at 0: the model unchanged
      base = getattr(self, name)
      lora = nnx.LoRA(base.in_features, cfg.lora_rank, base.out_features, dtype=dtype, rngs=rngs)
      setattr(self, f"{name}_lora", lora)

  def _dense(self, name: str, x):
    """Projection `name` of x, plus its low-rank adapter's (lora_alpha / lora_rank) · x A B."""
    y = getattr(self, name)(x)
    lora = getattr(self, f"{name}_lora", None)
    return y if lora is None else y + (self.cfg.lora_alpha / self.cfg.lora_rank) * lora(x)

  def _heads(self, x, positions):
    """x [B,T,d], positions [T] or [B,T] -> q [B,H,T,Dh], k and v [B,K,T,Dh]."""
    b, t, _ = x.shape
    c, dh = self.cfg, self.cfg.head_dim
    g = c.n_heads // c.kv_heads
    y = self._dense("qkv", self.norm1(x)).reshape(b, t, c.kv_heads, g + 2, dh)
    q, k, v = y[:, :, :, :g].reshape(b, t, c.n_heads, dh), y[:, :, :, g], y[:, :, :, g + 1]
    q, k, v = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
    if c.positions == "rope":
      q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    return q, k, v

  def _finish(self, x, att):
    b, _, t, _ = att.shape
    x = x + self._dense("proj", att.transpose(0, 2, 1, 3).reshape(b, t, -1))
    h = self._dense("up", self.norm2(x))
    if self.cfg.mlp == "swiglu":
      h = h.reshape(*h.shape[:-1], self.cfg.d_ff, 2)
      gate, up = h[..., 0], h[..., 1]
      return x + self._dense("down", jax.nn.silu(gate) * up)
    return x + self._dense("down", jax.nn.gelu(h))

  def __call__(self, x, positions, segments=None):
    """Full causal pass: x [B,T,d] -> (x, (k, v)) with k, v [B,K,T,Dh] for a cache; segments
    [B,T] or None (_attend_causal)."""
    q, k, v = self._heads(x, positions)
    return self._finish(x, _attend_causal(q, k, v, self.cfg, segments)), (k, v)

  def decode(self, x, k_cache, v_cache, pos):
    """One token: x [B,1,d], caches [B,K,L,Dh], pos scalar -> (x, k_cache, v_cache)."""
    q, k, v = self._heads(x, jnp.reshape(pos, (1,)))
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=2)
    mask = (jnp.arange(k_cache.shape[2]) <= pos)[None, None, None, :]
    return self._finish(x, _attend(q, k_cache, v_cache, mask)), k_cache, v_cache


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, vocab] (causal)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, **kw)
    if cfg.positions == "learned":
      pos = 0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model))
      self.pos = nnx.Param(pos.astype(cfg.param_dtype))
    blocks = [Block(cfg, rngs) for _ in range(cfg.n_layers)]
    self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, **kw)
    if not cfg.tie_embeddings:
      self.unembed = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, **kw)

  def _logits(self, x):
    x = self.norm(x)
    return self.embed.attend(x) if self.cfg.tie_embeddings else self.unembed(x)

  def _embed(self, tokens, start, positions=None):
    """tokens [B, T] at positions start.. (or at positions [B, T]) -> [B, T, d]."""
    x = self.embed(tokens)
    if self.cfg.positions == "learned":
      if positions is None:
        pos = jax.lax.dynamic_slice_in_dim(self.pos[...], start, tokens.shape[1])[None]
      else:
        pos = self.pos[...][positions]
      x = x + pos.astype(x.dtype)
    return x

  def __call__(self, tokens):
    logits, _ = self.prefill(tokens)
    return logits

  def hidden(self, tokens, segments=None, layers: slice = slice(None), x=None):
    """tokens [B, T] -> the last block's output [B, T, d] (before the final norm), and every
    block's keys and values ([layers, B, K, T, Dh] each). segments [B, T] (packed rows, each token
    its sequence's id): positions restart at each segment, and no token attends across segments.
    layers: which blocks run (all by default); x [B, T, d]: the input of the first of them (the
    output of those before it) instead of the tokens' embedding."""
    positions = jnp.arange(tokens.shape[1]) if segments is None else segment_positions(segments)
    if x is None:
      x = self._embed(tokens, 0, None if segments is None else positions)
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      state = jax.tree.map(lambda leaf: leaf[layers], state)
      step = lambda x, layer: self._run(graphdef, layer, x, positions, segments)
      x, (ks, vs) = jax.lax.scan(step, x, state)
      return x, ks, vs
    ks, vs = [], []
    for block in list(self.blocks)[layers]:
      x, (k, v) = self._run(*nnx.split(block), x, positions, segments)
      ks.append(k)
      vs.append(v)
    return x, jnp.stack(ks), jnp.stack(vs)

  def _run(self, graphdef, state, x, positions, segments=None):
    """One block's full pass as a pure function of its state, under jax.checkpoint with remat
    (nnx.remat cannot hold a block merged from several parts, as LoRA's adapters and base)."""
    pure = lambda state, x: nnx.merge(graphdef, state)(x, positions, segments)
    if self.cfg.remat == "none":
      return pure(state, x)
    return jax.checkpoint(pure, policy=REMAT[self.cfg.remat])(state, x)

  def prefill(self, tokens):
    """tokens [B, T] -> (logits [B, T, V], cache) with the cache holding positions < T."""
    x, ks, vs = self.hidden(tokens)
    pad = [(0, 0), (0, 0), (0, 0), (0, self.cfg.max_len - tokens.shape[1]), (0, 0)]
    return self._logits(x), {"k": jnp.pad(ks, pad), "v": jnp.pad(vs, pad)}

  def decode(self, token, cache, pos):
    """token [B] at position pos (scalar) -> (logits [B, V], cache with pos filled)."""
    x = self._embed(token[:, None], pos)
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def layer(x, args):
        state, k, v = args
        x, k, v = nnx.merge(graphdef, state).decode(x, k, v, pos)
        return x, (k, v)

      x, (ks, vs) = jax.lax.scan(layer, x, (state, cache["k"], cache["v"]))
      return self._logits(x)[:, 0], {"k": ks, "v": vs}
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block.decode(x, cache["k"][i], cache["v"][i], pos)
      ks.append(k)
      vs.append(v)
    return self._logits(x)[:, 0], {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def _stack(trees: list):
  """Trees of one structure -> one tree of it, each leaf theirs stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_modules(modules: list) -> nnx.Module:
  """Modules of one structure -> one module of it whose every variable is theirs stacked on a new
  leading axis (the scanned blocks: lax.scan runs it one slice at a time)."""
  return nnx.merge(nnx.graphdef(modules[0]), _stack([nnx.state(m) for m in modules]))


def stacked(keys: tuple) -> bool:
  """Whether a parameter (by its key path) is a scanned model's stacked block leaf
  [n_layers, ...] (blocks/qkv/kernel), not one block's (blocks/3/qkv/kernel) nor outside them."""
  keys = tuple(k for k in keys if k is not None)
  i = keys.index("blocks") + 1 if "blocks" in keys else len(keys)
  return i < len(keys) and not str(keys[i]).isdigit()


def stack_blocks(pure: dict) -> dict:
  """A per-layer model's pure-dict state -> the scanned model's (its blocks stacked in order)."""
  layers = [pure["blocks"][k] for k in sorted(pure["blocks"], key=int)]
  return {**pure, "blocks": _stack(layers)}


def segment_positions(segments):
  """segments [B, T] -> [B, T]: each token's index within its run of equal segment ids."""
  t = jnp.arange(segments.shape[1])
  new = jnp.concatenate(
    [jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1
  )
  return t - jax.lax.cummax(jnp.where(new, t, 0), axis=1)


def token_logprobs(
  model: Transformer, tokens, temperature: float = 1.0, segments=None, trunk=None, trunk_layers=0
):
  """tokens [B, T] -> [B, T]: entry t is log p(tokens[t] | tokens[<t]) (the model's distribution at
  `temperature`: softmax(logits / temperature)); entry 0 is 0. trunk [B, T - 1, d]: the output of
  the model's lower trunk_layers blocks on tokens[:, :-1] (make_trunk_fn), from which only the
  blocks above run.

  With model.cfg.logits_chunk = c > 0 the logits are made c positions at a time and recomputed
  in the backward pass, so at most [B, c, V] of them exist at once."""
  c = model.cfg.logits_chunk
  targets = tokens[:, 1:]
  scale = (lambda x: x) if temperature == 1.0 else (lambda x: x / temperature)
  inputs = (tokens[:, :-1], None if segments is None else segments[:, :-1])
  if trunk is None:
    x, _, _ = model.hidden(*inputs)
  else:
    x, _, _ = model.hidden(*inputs, layers=slice(trunk_layers, None), x=trunk)
  if not c or c >= targets.shape[1]:
    picked = objectives.token_logprobs(scale(model._logits(x)), targets)
    return jnp.pad(picked, ((0, 0), (1, 0)))
  b, t, d = x.shape
  n = -(-t // c)
  xs = jnp.pad(x, [(0, 0), (0, n * c - t), (0, 0)]).reshape(b, n, c, d).swapaxes(0, 1)
  ys = jnp.pad(targets, [(0, 0), (0, n * c - t)]).reshape(b, n, c).swapaxes(0, 1)
  chunk = jax.checkpoint(lambda xy: objectives.token_logprobs(scale(model._logits(xy[0])), xy[1]))
  picked = jax.lax.map(chunk, (xs, ys)).swapaxes(0, 1).reshape(b, n * c)[:, :t]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def make_logprob_fn(
  graphdef,
  n_layers: int = 0,
  train_layers: int = 0,
  temperature: float = 1.0,
  packed_rows: int = 0,
  packed_groups: int = 1,
):
  """The LM's `logprob_fn(params, batch) -> [B, T]` for the shared update step (batch["tokens"]):
  token_logprobs at `temperature`. packed_rows > 0: the batch's sequences computed packed into
  that many rows when they fit (lm/packing.py; batch["mask"] gives their lengths), the same
  values at less cost; in packed_groups blocks, one per data-parallel device.

  0 < train_layers < n_layers: only the top train_layers of the n_layers blocks and the final norm
  get gradients; the embedding (tied to the output) and the lower blocks are held constant, so the
  backward pass stops at the lowest trained block. params may also be core.state.whole's
  {"trained": adapters, "frozen": base} of a model with LoRA adapters (lm/lora.py).
  """

  frozen = n_layers - train_layers if 0 < train_layers < n_layers else 0

  def logprob_fn(params, batch):
    if isinstance(params, dict) and set(params) == {"trained", "frozen"}:
      model = nnx.merge(graphdef, params["trained"], params["frozen"])
    else:
      if frozen:
        params = hold_lower_layers(params, n_layers, train_layers, jax.lax.stop_gradient)
      model = nnx.merge(graphdef, params)
    if "trunk" in batch:  # the frozen blocks' output (make_trunk_fn): only the blocks above run
      if not frozen:
        raise ValueError("a batch with a trunk needs the logprob_fn of the same train_layers")
      return token_logprobs(model, batch["tokens"], temperature, None, batch["trunk"], frozen)
    rows = lambda tokens, segments: token_logprobs(model, tokens, temperature, segments)
    if not packed_rows:
      return rows(batch["tokens"], None)
    return packing.packed_logprobs(rows, batch["tokens"], batch["mask"], packed_rows, packed_groups)

  return logprob_fn


def make_trunk_fn(graphdef, n_layers: int, train_layers: int):
  """The update's `trunk_fn(params, batch) -> batch` when only the top train_layers of n_layers
  blocks train (core.step.make_update): the embedding and the lower blocks are frozen, the same in
  θ, q and π_ref, so their output on the batch ("trunk" [B, T - 1, d]) is computed once and the
  three log-probs run only the blocks above it (make_logprob_fn). Padded batches only."""
  frozen = n_layers - train_layers

  def trunk_fn(params, batch):
    model = nnx.merge(graphdef, params)
    x, _, _ = model.hidden(batch["tokens"][:, :-1], layers=slice(0, frozen))
    return {**batch, "trunk": jax.lax.stop_gradient(x)}

  return trunk_fn


def qkv_columns(cfg: LMConfig) -> np.ndarray:
  """[(H + 2K) · Dh] indices: qkv's grouped columns as positions in [q | k | v] order (q heads,
  then k heads, then v heads, each Dh wide); new[:, i] = fused[:, qkv_columns[i]]."""
  h, kv, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  g = h // kv
  heads = [[j * g + i for i in range(g)] + [h + j, h + kv + j] for j in range(kv)]
  return (np.asarray(heads).reshape(-1, 1) * dh + np.arange(dh)).reshape(-1)


def up_columns(cfg: LMConfig) -> np.ndarray:
  """[2 · d_ff] (SwiGLU) or [d_ff] indices: up's columns as positions in [gate | up] order."""
  f = cfg.d_ff
  if cfg.mlp != "swiglu":
    return np.arange(f)
  return np.stack([np.arange(f), f + np.arange(f)], axis=1).reshape(-1)


def tensor_parallel_dim(keys: tuple, shape) -> int | None:
  """Which dimension of a parameter (by its key path; a prefix such as an optimiser moment's is
  ignored) is split over the mesh's model axis, Megatron-style: qkv's and up's output columns
  (whole key/value-head groups and MLP units, so attention and the activation stay local), proj's
  and down's input rows (their products are summed over the axis). None: not split (norms,
  embeddings, LoRA adapters)."""
  keys = tuple(k for k in keys if k is not None)
  if "blocks" not in keys or len(keys) < 2:
    return None
  name, leaf = keys[-2], keys[-1]
  if name in ("qkv", "up"):
    return len(shape) - 1
  if name in ("proj", "down") and leaf == "kernel":
    return 1 if stacked(keys) else 0
  return None


def check_tensor_parallel(cfg: LMConfig, mesh) -> None:
  """The mesh's model axis splits whole key/value-head groups and MLP units (else a UserError
  naming the setting)."""
  ways = mesh.shape.get("model", 1)
  if cfg.kv_heads % ways:
    raise UserError(
      f"tensor_parallel {ways} must divide the model's {cfg.kv_heads} key/value heads"
    )
  if cfg.d_ff % ways:
    raise UserError(f"tensor_parallel {ways} must divide the model's MLP width {cfg.d_ff}")


def trainable(path, n_layers: int, train_layers: int) -> bool:
  """Whether a parameter (by its tree path) trains when only the top train_layers blocks do; a
  stacked block leaf trains, its lower layers held by hold_lower_layers."""
  keys = path_keys(path)
  if "blocks" in keys:
    return stacked(keys) or int(keys[keys.index("blocks") + 1]) >= n_layers - train_layers
  return "embed" not in keys and "pos" not in keys


def hold_lower_layers(tree, n_layers: int, train_layers: int, hold):
  """tree (parameters, or updates of them) with hold(x) applied where only the top train_layers
  blocks train: whole leaves that do not train (trainable), and a stacked leaf's lower
  n_layers - train_layers layers."""
  frozen = n_layers - train_layers

  def leaf(path, x):
    if stacked(path_keys(path)):
      return jnp.concatenate([hold(x[:frozen]), x[frozen:]])
    return x if trainable(path, n_layers, train_layers) else hold(x)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def matrices(params):
  """Weight decay's mask: True for one layer's weight matrices (2 or more dimensions, a stacked
  leaf's layer axis not counted), False for norms, biases and scalars."""
  ndim = lambda path, x: x.ndim - stacked(path_keys(path))
  return jax.tree_util.tree_map_with_path(lambda path, x: ndim(path, x) >= 2, params)


def top_layers(tree, n_layers: int, train_layers: int):
  """tree with every stacked leaf [n_layers, ...] cut to its top train_layers layers."""
  frozen = n_layers - train_layers
  cut = lambda path, x: x[frozen:] if stacked(path_keys(path)) else x
  return jax.tree_util.tree_map_with_path(cut, tree)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
