"""The language pipeline's iw-SFT update as the LM benchmarks size and run it: the authors' LM
recipe (π_ref's log-probs precomputed, q the current model detached, AdamW with clipping), the
lean state (no q or π_ref copies), the whole model trained or LoRA adapters on a frozen base."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iwsft import recipes
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.sharding import batch_sharded, replicated, state_sharding
from iwsft.core.state import init_state
from iwsft.core.step import make_update, state_parts
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, matrices, tensor_parallel_dim

PARTS = state_parts(recipes.LM, False, True)  # the lean state: no q, no π_ref copies


def optimizer(moment_dtype: str = ""):
  """The recipe's AdamW (0.95, clipping at 1.0, weight decay 1e-4 on the weight matrices as the
  language pipeline's, learning rate 1e-5)."""
  stage = StageConfig(
    steps=100, batch_size=8, learning_rate=1e-5, weight_decay=1e-4, moment_dtype=moment_dtype
  )
  return make_optimizer(dataclasses.replace(stage, adam_b2=0.95, clip_norm=1.0), matrices)


def _state(model, opt, lora: bool):
  if not lora:
    graphdef, params = nnx.split(model)
    return graphdef, init_state(params, opt, 0, params, **PARTS)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  return graphdef, init_state(adapters, opt, 0, None, **PARTS, frozen=base)


def abstract_state(cfg: LMConfig, opt):
  """(graphdef, the training state's shapes); with cfg.lora_rank its adapters on the frozen
  base (as the language pipeline's finetune stage)."""
  graphdefs = []  # the graphdef is static: made while tracing

  def make():
    graphdef, state = _state(Transformer(cfg, rngs=nnx.Rngs(0)), opt, cfg.lora_rank > 0)
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(make)
  return graphdefs[0], state


def concrete_state(cfg: LMConfig, opt, shardings):
  """The training state of a randomly initialised model, made inside jit in `shardings`."""
  make = lambda: _state(Transformer(cfg, rngs=nnx.Rngs(0)), opt, cfg.lora_rank > 0)[1]
  return jax.jit(make, out_shardings=shardings)()


def batch_shapes(b: int, tokens: int) -> dict:
  """A batch of b sequences of tokens + 1 ids, with π_ref's log-probs precomputed."""
  return {
    "tokens": jax.ShapeDtypeStruct((b, tokens + 1), jnp.int32),
    "mask": jax.ShapeDtypeStruct((b, tokens + 1), jnp.float32),
    "weight": jax.ShapeDtypeStruct((b,), jnp.float32),
    "logp_ref": jax.ShapeDtypeStruct((b, tokens + 1), jnp.float32),
  }


def random_batch(b: int, tokens: int, vocab: int, seed: int = 0) -> dict:
  """A batch of batch_shapes' form: random ids, the last three quarters a completion."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(tokens + 1) >= (tokens + 1) // 4).astype(np.float32)
  return {
    "tokens": rng.integers(0, vocab, (b, tokens + 1)).astype(np.int32),
    "mask": np.broadcast_to(mask, (b, tokens + 1)).copy(),
    "weight": np.ones(b, np.float32),
    "logp_ref": np.full((b, tokens + 1), -2.0, np.float32),
  }


def jitted_step(cfg: LMConfig, mesh, micro_batches: int = 1, moment_dtype: str = ""):
  """(the update jitted with the state's shardings on `mesh` and the state donated, its abstract
  state, the state's shardings, the optimiser)."""
  opt = optimizer(moment_dtype)
  graphdef, state = abstract_state(cfg, opt)
  update = make_update(make_logprob_fn(graphdef), opt, recipes.LM, micro_batches=micro_batches)
  shardings = state_sharding(state, mesh, split=tensor_parallel_dim)
  step = jax.jit(
    update,
    in_shardings=(shardings, batch_sharded(mesh)),
    out_shardings=(shardings, replicated(mesh)),
    donate_argnums=0,
  )
  return step, state, shardings, opt


def sharded_bytes(state, shardings) -> float:
  """Bytes one device holds of `state` under `shardings` (exact, from the shard shapes)."""
  total = 0
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    total += np.prod(s.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
  return float(total)
