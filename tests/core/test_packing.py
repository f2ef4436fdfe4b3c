"""Packed episode batches and π_ref's log-probs computed once: the exact speed-ups of the control
pipeline, each checked against the padded computation it replaces."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import iwsft
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.core import packing
from iwsft.core.objectives import ObjectiveConfig


def _policy(seed=0):
  return split_policy(GaussianPolicy(4, 2, PolicyConfig(hidden=(16, 16)), rngs=nnx.Rngs(seed)))


def _pool(lengths, t=None, seed=3):
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  n, t = len(lengths), t or int(lengths.max())
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  return {
    "observations": rng.normal(size=(n, t, 4)).astype(np.float32) * mask[..., None],
    "actions": rng.uniform(-1, 1, (n, t, 2)).astype(np.float32) * mask[..., None],
    "mask": mask,
    "weight": np.ones(n, np.float32),
  }


def test_plan_lays_the_steps_end_to_end():
  got = jax.tree.map(np.asarray, packing.plan(jnp.array([3, 1, 4]), 10))
  np.testing.assert_array_equal(got["row"][:8], [0, 0, 0, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(got["pos"][:8], [0, 1, 2, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(got["valid"], [1] * 8 + [0, 0])
  short = jax.tree.map(np.asarray, packing.plan(jnp.array([3, 1, 4]), 5))  # steps beyond C dropped
  np.testing.assert_array_equal(short["valid"], [1] * 5)


def test_packed_log_probs_are_the_padded_ones_at_real_steps():
  graphdef, params, consts = _policy()
  logprob = make_logprob_fn(graphdef, consts)
  data = _pool([7, 2, 9, 1, 5])
  idx = jnp.array([2, 0, 0, 3, 4, 1])  # a repeated episode takes two rows
  lengths = jnp.asarray(data["mask"].sum(1), jnp.int32)
  packed = packing.gather_packed(jax.tree.map(jnp.asarray, data), idx, lengths, 40)
  assert packed[packing.PACKED]["observations"].shape == (40, 1, 4)
  # the distinct episodes' 9 + 7 + 1 + 5 + 2 steps, once each
  np.testing.assert_array_equal(packed[packing.PACKED]["valid"], [1] * 24 + [0] * 16)
  got = np.asarray(packing.markov_logprob(logprob)(params, packed))
  # independent: the policy's density at each real step, one step at a time in float64
  policy = nnx.merge(graphdef, params, consts)
  mean = np.asarray(policy(jnp.asarray(data["observations"]))[0], np.float64)
  log_std = np.asarray(policy.log_std[...], np.float64)
  z = (data["actions"] - mean) / np.exp(log_std)
  dens = (-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1) * data["mask"]
  np.testing.assert_allclose(got, dens[np.asarray(idx)], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(packed["mask"]), data["mask"][np.asarray(idx)])


def _update(q_decay=0.9, weighting="sequence"):
  graphdef, params, consts = _policy()
  logprob = packing.markov_logprob(make_logprob_fn(graphdef, consts))
  opt = optax.adam(1e-2)
  objective = ObjectiveConfig(weighting, q_decay=q_decay, temperature=5.0)
  return logprob, opt, iwsft.make_update(logprob, opt, objective, track_bounds=True)


@pytest.mark.parametrize("seeds", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_packed_training_equals_padded_training(seeds):
  """Same sampled episodes, same updates: parameters after 12 updates agree with the padded run's,
  whether every batch fits the capacity, none does (all computed padded), or some do."""
  lengths = np.array([3, 30, 2, 5, 28, 1, 4, 6, 2, 3, 30, 2])
  data, logits = _pool(lengths), np.linspace(-1, 1, 12).astype(np.float32)
  logprob, opt, update = _update()
  mesh = iwsft.make_mesh(1)
  ref = jax.tree.map(lambda x: x + 0.05, _policy(7)[1])
  init = [iwsft.init_state(_policy(s)[1], opt, 10 + s, ref) for s in range(seeds)]
  state0 = iwsft.stack_seeds(init)

  def run(capacity):
    steps = iwsft.make_train_steps(
      update, mesh, iwsft.Sampling(12, 8, capacity=capacity), 12, vmapped=seeds > 1
    )
    return steps(
      jax.tree.map(jnp.array, state0), iwsft.core.sharding.shard_pool(data, mesh), logits
    )

  padded, m0 = run(None)
  for capacity, fallback in ((8 * 30, 0.0), (8, 1.0), (64, None)):
    packed, m = run(capacity)
    chex.assert_trees_all_close(packed.params, padded.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-4, atol=1e-6)
    over = np.max(np.reshape(m["batch/steps"], (12, -1)), axis=1) > capacity
    np.testing.assert_array_equal(np.reshape(m["batch/padded"], (12, -1))[:, 0], over)
    if fallback is not None:
      assert np.all(m["batch/padded"] == fallback)
    else:
      assert 0 < np.mean(m["batch/padded"]) < 1  # both branches taken within one dispatch


def test_pool_logprobs_match_the_policy_on_every_row_and_seed():
  data = _pool([7, 2, 9, 1, 5])
  graphdef, _, consts = _policy()
  logprob = make_logprob_fn(graphdef, consts)
  params = [_policy(s)[1] for s in range(3)]
  mesh = iwsft.make_mesh(1)
  pool = iwsft.core.sharding.shard_pool(data, mesh)
  got = np.asarray(iwsft.pool_logprobs(logprob, iwsft.stack_seeds(params), pool, mesh, True, 2))
  assert got.shape == (3, 5, 9)
  for s in range(3):
    want = np.asarray(logprob(params[s], jax.tree.map(jnp.asarray, data)))
    np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-5)


def test_precomputed_reference_per_seed_gives_the_in_batch_update():
  """Vmapped seeds with different π_ref each: feeding pool_logprobs as seed_data ("logp_ref")
  trains like recomputing π_ref in every batch, packed or padded."""
  lengths = np.array([3, 30, 2, 5, 28, 1, 4, 6, 2, 3, 30, 2])
  data, logits = _pool(lengths), np.zeros(12, np.float32)
  logprob, opt, update = _update(q_decay=0.0, weighting="step")
  mesh = iwsft.make_mesh(1)
  refs = [jax.tree.map(lambda x, s=s: x + 0.03 * s, _policy(9)[1]) for s in range(3)]
  init = iwsft.stack_seeds([iwsft.init_state(_policy(s)[1], opt, s, refs[s]) for s in range(3)])
  pool = iwsft.core.sharding.shard_pool(data, mesh)
  seed_data = {
    "logp_ref": iwsft.pool_logprobs(logprob, iwsft.stack_seeds(refs), pool, mesh, vmapped=True)
  }
  out = {}
  for name, sd, cap in (
    ("in-batch", None, None),
    ("pre", seed_data, None),
    ("pre+pack", seed_data, 64),
  ):
    steps = iwsft.make_train_steps(
      update, mesh, iwsft.Sampling(10, 8, capacity=cap), 10, vmapped=True
    )
    out[name] = steps(jax.tree.map(jnp.array, init), pool, logits, sd)[0].params
  chex.assert_trees_all_close(out["pre"], out["in-batch"], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(out["pre+pack"], out["in-batch"], rtol=1e-4, atol=1e-6)


def test_capacity_holds_the_stated_fraction_of_batches():
  rng = np.random.default_rng(1)
  lengths = np.where(rng.random(500) < 0.8, rng.integers(20, 200, 500), 1000)
  logits = rng.normal(size=500)
  c = packing.capacity(lengths, logits, 64, seeds=2, quantile=0.99)
  assert c % 64 == 0 and c < 64 * 1000
  # fresh batches from another generator: at most ~1% of steps overflow (2% with sampling noise);
  # a packed batch holds each distinct episode once
  p = np.exp(logits) / np.exp(logits).sum()
  idx = np.random.default_rng(99).choice(500, size=(5000, 2, 64), p=p)
  distinct = np.array([[lengths[list(set(b))].sum() for b in step] for step in idx])
  overflow = (distinct.max(-1) > c).mean()
  assert 0.001 < overflow < 0.02
  # equal lengths and hardly a repeat among 64 draws from 5,000: nothing to save
  assert packing.capacity(np.full(5000, 100), np.zeros(5000), 64) is None
  # 64 draws from 20 equal episodes hold at most 20 distinct ones
  assert packing.capacity(np.full(20, 100), np.zeros(20), 64) <= 2048
