"""A frozen trunk computed once: with only the top blocks trained, θ, q and π_ref share the
embedding and lower blocks, so make_update(trunk_fn=lm.model.make_trunk_fn) runs them once per
(micro-)batch — the same update (a lagged q and π_ref in the state, so all three log-probs are
computed), with fewer matrix products in the compiled step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.state import init_state
from iwsft.core.step import make_update
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, make_trunk_fn

CFG = LMConfig(
  vocab_size=40, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_len=16,
  positions="rope", mlp="swiglu", qkv_bias=True,
)  # fmt: skip
N, TRAIN = 4, 1  # blocks, of which the top TRAIN train


def _setup(trunk: bool, micro_batches: int, ref_temperature: float = 1.0):
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  # SGD: a parameter's difference is the gradients' (Adam's normalisation would magnify rounding
  # in near-zero gradients into whole steps); clipping reads every gradient, frozen ones too
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
  objective = ObjectiveConfig("sequence", temperature=1.0, q_decay=0.9)
  ref_fn = None
  if ref_temperature != 1.0:
    ref_fn = make_logprob_fn(graphdef, N, TRAIN, ref_temperature)
  update = make_update(
    make_logprob_fn(graphdef, N, TRAIN),
    opt,
    objective,
    track_bounds=True,
    micro_batches=micro_batches,
    ref_logprob_fn=ref_fn,
    trunk_fn=make_trunk_fn(graphdef, N, TRAIN) if trunk else None,
  )
  ref = jax.tree.map(lambda x: x * 0.98, params)  # π_ref differs from θ in every block
  state = init_state(params, opt, 0, ref)
  rng = np.random.default_rng(1)
  batch = {
    "tokens": jnp.asarray(rng.integers(0, 40, (4, 16)), jnp.int32),
    "mask": jnp.asarray(np.arange(16)[None] >= 5, jnp.float32).repeat(4, 0),
    "weight": jnp.ones(4, jnp.float32),
  }
  return update, state, batch


@pytest.mark.parametrize(
  "micro_batches,ref_temperature",
  [pytest.param(1, 1.0, marks=pytest.mark.slow), (2, 1.0), (1, 0.7)],  # (1, 1.0): make test-slow
)
def test_a_shared_frozen_trunk_gives_the_same_update(micro_batches, ref_temperature):
  """3 updates with and without the shared trunk: the same metrics, parameters and q. π_ref
  differs from θ in its top block only, as when fine-tuning starts from it."""
  runs = []
  for trunk in (False, True):
    update, state, batch = _setup(trunk, micro_batches, ref_temperature)
    # the frozen trunk is π_ref's own: θ's embedding and lower blocks in π_ref
    ref = nnx.to_pure_dict(state.ref_params)
    theta = nnx.to_pure_dict(state.params)
    for i in range(N - TRAIN):
      ref["blocks"][i] = theta["blocks"][i]
    ref["embed"] = theta["embed"]
    ref_state = state.ref_params
    nnx.replace_by_pure_dict(ref_state, ref)
    state = state.replace(ref_params=ref_state)
    step = jax.jit(update)
    metrics = []
    for _ in range(3):
      state, m = step(state, batch)
      metrics.append(m)
    runs.append((state, metrics))
  (a, ma), (b, mb) = runs
  for x, y in zip(ma, mb, strict=True):
    for k in x:
      np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)
  chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(b.q_params, a.q_params, rtol=1e-5, atol=1e-6)


def _dots(trunk: bool) -> int:
  update, state, batch = _setup(trunk, 1)
  jaxpr = jax.make_jaxpr(update)(state, batch)
  count = 0

  def walk(j):
    nonlocal count
    for eqn in j.eqns:
      count += eqn.primitive.name == "dot_general"
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return count


def test_the_trunk_runs_once_instead_of_three_times():
  """θ, q and π_ref each ran the 3 frozen blocks (4 projections and 2 attention products a
  block's forward pass); with the shared trunk they run once: 2 × 3 × 6 fewer products."""
  assert _dots(False) - _dots(True) == 2 * (N - TRAIN) * 6
