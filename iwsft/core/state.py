"""The training state: everything that changes during training, as one pytree.

A state may carry a leading seed axis [S, ...] on every leaf (stack_seeds): `loop.fit` then trains
the S runs in one program with the update vmapped over that axis, each with its own parameters,
optimiser state and sampling key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from iwsft.core.sharding import state_sharding

Params = Any


class TrainState(flax.struct.PyTreeNode):
  """params: the policy π_θ being trained.
  q_params: the auxiliary policy q of iw-SFT, an exponential moving average of params; None in a
    lean state where q is the current policy, detached (q_decay 0), or unused.
  ref_params: the frozen reference π_ref (the data's policy, or its stand-in); None in a lean
    state whose batches carry π_ref's log-probs ("logp_ref"), or that never needs them.
  opt_state: optax state for params.
  step: number of updates applied (int32 scalar).
  key: raw uint32 PRNG key [2] for in-graph sampling (raw so checkpoints stay plain arrays).
  frozen: parameters the model reads but nothing trains (a LoRA's base model), or None. With
    them, params, q_params and ref_params are the trained part only (the adapters), and the
    update's logprob_fn is given whole(part, frozen).
  """

  params: Params
  q_params: Params
  ref_params: Params
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array
  frozen: Params = None


def whole(params: Params, frozen: Params) -> Params:
  """What logprob_fn is given: params alone, or {"trained": params, "frozen": frozen}."""
  return params if frozen is None else {"trained": params, "frozen": frozen}


def prng_key(seed: int) -> jax.Array:
  """A raw uint32[2] key, the form TrainState and checkpoints hold."""
  return jax.random.key_data(jax.random.key(seed))


def init_state(
  params: Params,
  optimizer: optax.GradientTransformation,
  seed: int,
  ref_params: Params | None = None,
  *,
  keep_q: bool = True,
  keep_ref: bool = True,
  frozen: Params | None = None,
  mesh=None,
  split=None,
) -> TrainState:
  """Fresh state: q starts at params; π_ref defaults to params (fine-tuning starts from π_ref).

  keep_q / keep_ref False leave q / π_ref out (None): a model-sized copy each that the update
  does not need (step.state_parts says when). frozen: parameters held constant (TrainState),
  held as they are: the jitted steps never donate them. Every other array is copied, so the
  jitted steps may donate the state's buffers without deleting the caller's arrays.
  mesh: the state is made inside one jitted function with each leaf born in its sharding there
  (sharding.state_sharding with `split`), so no copy or optimiser moment is ever whole on one
  device.
  """
  if mesh is not None:
    make = lambda p, r: init_state(p, optimizer, seed, r, keep_q=keep_q, keep_ref=keep_ref)
    shardings = state_sharding(jax.eval_shape(make, params, ref_params), mesh, split=split)
    return jax.jit(make, out_shardings=shardings)(params, ref_params).replace(frozen=frozen)
  copy = lambda t: jax.tree.map(jnp.array, t)
  params = copy(params)
  return TrainState(
    params=params,
    q_params=copy(params) if keep_q else None,
    ref_params=copy(params if ref_params is None else ref_params) if keep_ref else None,
    opt_state=optimizer.init(params),
    step=jnp.zeros((), jnp.int32),
    key=prng_key(seed),
    frozen=frozen,
  )


def update_q(q_params: Params, params: Params, q_decay: float) -> Params:
  """iw-SFT's auxiliary policy after one update: q ← q_decay · q + (1 − q_decay) · θ (an EMA of
  the trained parameters; q_decay = 0 makes q the current policy). None stays None (a lean
  state without q)."""
  if q_params is None:
    return None
  return optax.incremental_update(params, q_params, step_size=1.0 - q_decay)


def stack_seeds(trees: Sequence):
  """Runs' pytrees -> one pytree: a single run as it is, several stacked on a leading axis [S,
  ...]."""
  if len(trees) == 1:
    return trees[0]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_seeds(tree, count: int) -> list:
  """The inverse of stack_seeds: `count` per-run pytrees."""
  return [tree] if count == 1 else [seed_slice(tree, i) for i in range(count)]


def num_seeds(state: TrainState) -> int | None:
  """S for a state with a seed axis, None for a single run."""
  return None if state.step.ndim == 0 else int(state.step.shape[0])


def seed_slice(tree, i: int | None):
  """Seed i of a stacked pytree; the tree itself when i is None (a single run)."""
  return tree if i is None else jax.tree.map(lambda x: x[i], tree)
