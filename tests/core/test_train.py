"""The shared update step: policy maths, q's moving average, sampling, and device-count
invariance."""

import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import iwsft
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.core.objectives import ObjectiveConfig


def small_policy(state_dependent_std=False, seed=0):
  return GaussianPolicy(
    4,
    2,
    PolicyConfig(hidden=(16, 16), state_dependent_std=state_dependent_std),
    rngs=nnx.Rngs(seed),
  )


def test_log_prob_is_the_diagonal_normal_density():
  pol = small_policy()
  pol.set_normalisation(np.zeros(4), np.ones(4), np.array([-2.0, -1.0]), np.array([2.0, 3.0]))
  obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  act = np.random.default_rng(1).uniform(-1, 1, (5, 2)).astype(np.float32)
  mean, log_std = pol(obs)
  mean, std = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
  a = (act - np.array([0.0, 1.0])) / np.array([2.0, 2.0])
  expected = np.sum(-0.5 * ((a - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi), -1)
  np.testing.assert_allclose(np.asarray(pol.log_prob(obs, act)), expected, rtol=1e-5)
  mode = np.asarray(pol.mode(obs))
  assert np.all(mode >= [-2, -1]) and np.all(mode <= [2, 3])


@pytest.mark.parametrize("sd", [False, True])
def test_log_std_is_clipped(sd):
  pol = small_policy(sd)
  if sd:
    pol.log_std_head.bias[...] = jnp.full((2,), 50.0)
  else:
    pol.log_std[...] = jnp.array([50.0, -50.0])
  _, log_std = pol(jnp.ones((3, 4)))
  assert float(log_std.max()) <= 2.0 and float(log_std.min()) >= -5.0


def _setup(q_decay, weighting="sequence"):
  graphdef, params, consts = split_policy(small_policy())
  logprob = make_logprob_fn(graphdef, consts)
  opt = optax.sgd(0.1)
  update = iwsft.make_update(
    logprob, opt, ObjectiveConfig(weighting, temperature=1.0, q_decay=q_decay)
  )
  rng = np.random.default_rng(0)
  batch = {
    "observations": rng.normal(size=(8, 5, 4)).astype(np.float32),
    "actions": rng.uniform(-1, 1, (8, 5, 2)).astype(np.float32),
    "mask": np.ones((8, 5), np.float32),
    "weight": np.ones(8, np.float32),
  }
  return params, opt, update, batch, logprob


def test_q_is_an_exponential_moving_average_of_the_policy():
  params, opt, update, batch, _ = _setup(q_decay=0.9)
  state = iwsft.init_state(params, opt, 0)
  q0 = state.q_params
  state, _ = jax.jit(update)(state, batch)
  expected = jax.tree.map(lambda q, p: 0.9 * q + 0.1 * p, q0, state.params)
  chex.assert_trees_all_close(state.q_params, expected, rtol=1e-6)
  assert int(state.step) == 1


def test_iw_update_equals_sft_update_when_q_and_ref_are_the_start_policy():
  """At step 0, q = π_ref = θ: weights are 1 and iw-SFT's step is SFT's step."""
  params, opt, update_iw, batch, logprob = _setup(q_decay=0.9)
  update_sft = iwsft.make_update(logprob, opt, ObjectiveConfig("none", q_decay=0.9))
  s_iw, m = jax.jit(update_iw)(iwsft.init_state(params, opt, 0), batch)
  s_sft, _ = jax.jit(update_sft)(iwsft.init_state(params, opt, 0), batch)
  chex.assert_trees_all_close(s_iw.params, s_sft.params, rtol=1e-6)
  np.testing.assert_allclose(float(m["iw/max_weight"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
  "objective,precomputed",
  [
    (ObjectiveConfig("none"), False),
    (ObjectiveConfig("sequence", temperature=3.0, q_decay=0.9), False),
    (ObjectiveConfig("sequence", temperature=3.0, q_decay=0.9), True),
    (ObjectiveConfig("sequence", temperature=1.0, q_decay=0.0, reduction="token_mean"), False),
    (ObjectiveConfig("step", temperature=2.0, q_decay=0.9, step_normalise=True), True),
    (ObjectiveConfig("sequence", length_normalise=False, self_normalise=False), False),
  ],
  ids=["sft", "sequence", "sequence-precomputed-ref", "lm-token-mean", "step", "unnormalised"],
)
def test_micro_batches_give_the_update_of_the_whole_batch(objective, precomputed):
  """4 micro-batches of 2 rows (padding rows and uneven lengths among them) accumulate the
  gradient, weights and metrics of the batch of 8 taken at once."""
  params, _, _, batch, logprob = _setup(q_decay=0.9)
  rng = np.random.default_rng(1)
  batch["mask"] = (np.arange(5)[None] < rng.integers(1, 6, 8)[:, None]).astype(np.float32)
  batch["weight"] = np.array([1, 1, 0, 1, 0.5, 1, 1, 0], np.float32)
  ref = jax.tree.map(lambda x: x + 0.05, params)
  if precomputed:
    batch["logp_ref"] = np.asarray(logprob(ref, batch))
  opt = optax.sgd(0.1)
  state = iwsft.init_state(params, opt, 0, ref)
  state = state.replace(q_params=jax.tree.map(lambda x: x - 0.05, params))
  whole = iwsft.make_update(logprob, opt, objective)
  parts = iwsft.make_update(logprob, opt, objective, micro_batches=4)
  a, ma = jax.jit(whole)(state, batch)
  b, mb = jax.jit(parts)(state, batch)
  # float32 sums in another order: a wrong weight or denominator would be off by > 1e-2
  chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(b.q_params, a.q_params, rtol=1e-5, atol=1e-5)
  assert ma.keys() == mb.keys()
  for k in ma:
    np.testing.assert_allclose(mb[k], ma[k], rtol=2e-5, atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="must divide"):
    jax.jit(iwsft.make_update(logprob, opt, objective, micro_batches=3))(state, batch)


@pytest.mark.parametrize(
  "objective,precomputed,parts",
  [
    (iwsft.recipes.LM, True, {"keep_q": False, "keep_ref": False}),
    (iwsft.recipes.CONTROL, True, {"keep_q": True, "keep_ref": False}),
    (iwsft.recipes.CONTROL, False, {"keep_q": True, "keep_ref": True}),
    (iwsft.recipes.SFT, False, {"keep_q": False, "keep_ref": False}),
  ],
  ids=["lm", "control", "control-ref-in-state", "sft"],
)
def test_a_lean_state_holds_only_the_copies_its_update_reads(objective, precomputed, parts):
  """state_parts drops q when it is the detached current model and π_ref when its log-probs come
  with the batch; the lean state's update equals the full state's."""
  params, _, _, batch, logprob = _setup(q_decay=0.9)
  ref = jax.tree.map(lambda x: x + 0.05, params)
  if precomputed:
    batch["logp_ref"] = np.asarray(logprob(ref, batch))
  assert iwsft.core.step.state_parts(objective, False, precomputed) == parts
  opt = optax.adam(1e-2)
  update = jax.jit(iwsft.make_update(logprob, opt, objective))
  full = iwsft.init_state(params, opt, 0, ref)
  full = full.replace(q_params=jax.tree.map(lambda x: x - 0.05, params))
  lean = iwsft.init_state(params, opt, 0, ref, **parts)
  if parts["keep_q"]:
    lean = lean.replace(q_params=full.q_params)
  assert (lean.q_params is None) != parts["keep_q"] and (lean.ref_params is None) != parts[
    "keep_ref"
  ]
  for _ in range(3):
    full, mf = update(full, batch)
    lean, ml = update(lean, batch)
  chex.assert_trees_all_close(lean.params, full.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ml["loss"], mf["loss"], rtol=1e-6)


def test_an_update_that_needs_a_dropped_copy_says_so():
  params, opt, _, batch, logprob = _setup(q_decay=0.9)
  update = iwsft.make_update(logprob, opt, iwsft.recipes.CONTROL)
  with pytest.raises(ValueError, match="no π_ref"):
    update(iwsft.init_state(params, opt, 0, keep_ref=False), batch)
  with pytest.raises(ValueError, match="no q"):
    update(iwsft.init_state(params, opt, 0, keep_q=False), batch)


def test_sgd_step_follows_the_weighted_bc_gradient():
  """θ' = θ − lr · ∇θ(−Σ_i w_i ℓ_i / n) with w computed independently from q and π_ref."""
  params, opt, update, batch, logprob = _setup(q_decay=0.5)
  ref = jax.tree.map(lambda x: x + 0.05, params)
  state = iwsft.init_state(params, opt, 0, ref)
  state = state.replace(q_params=jax.tree.map(lambda x: x - 0.05, params))
  lq = np.asarray(logprob(state.q_params, batch), np.float64).mean(1)
  lr_ = np.asarray(logprob(ref, batch), np.float64).mean(1)
  w = np.exp(lq - lr_)
  w = w / w.mean()

  def bc_loss(p):
    return -jnp.mean(jnp.asarray(w, jnp.float32) * logprob(p, batch).mean(1))

  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(bc_loss)(params))
  new, _ = jax.jit(update)(state, batch)
  chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inverse_cdf", [False, True])
def test_sample_sequences_follows_logits(inverse_cdf):
  data = {"mask": np.ones((4, 3), np.float32), "weight": np.arange(4, dtype=np.float32)}
  logits = jnp.log(jnp.array([0.0, 1.0, 3.0, 0.0]))
  b = iwsft.core.step.sample_sequences(jax.random.key(0), data, logits, 4000, inverse_cdf)
  counts = np.bincount(np.asarray(b["weight"]).astype(int), minlength=4)
  assert counts[0] == 0 and counts[3] == 0
  np.testing.assert_allclose(counts[2] / counts[1], 3.0, rtol=0.15)


@pytest.mark.parametrize("inverse_cdf", [False, True])
def test_sample_steps_only_draws_real_steps_uniformly(inverse_cdf):
  n, t = 3, 4
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
  step_id = np.arange(n * t, dtype=np.float32).reshape(n, t)
  data = {"mask": mask, "weight": np.ones(n, np.float32), "id": step_id}
  b = iwsft.core.step.sample_steps(jax.random.key(1), data, jnp.zeros(n), 7000, inverse_cdf)
  chex.assert_shape(b["id"], (7000, 1))
  chex.assert_shape(b["weight"], (7000,))
  ids = np.asarray(b["id"]).ravel().astype(int)
  assert set(ids) == set(np.flatnonzero(mask.ravel()))  # never a padding step
  counts = np.bincount(ids, minlength=n * t)[mask.ravel() > 0]
  np.testing.assert_allclose(
    counts / counts.sum(), 1 / 7, atol=0.02
  )  # uniform over the 7 real steps


def _run_script(devices, out):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
  )
  script = os.path.join(os.path.dirname(__file__), "..", "helpers", "sharded_update_script.py")
  subprocess.run([sys.executable, script, str(out)], env=env, check=True, capture_output=True)
  return np.load(out)


def test_update_is_the_same_on_1_and_8_devices(tmp_path):
  one = _run_script(1, tmp_path / "one.npz")
  eight = _run_script(8, tmp_path / "eight.npz")
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  keys = [k for k in one.files if k != "devices"]
  assert any(k.startswith("a") for k in keys) and any(k.startswith("b") for k in keys)
  assert any(k.startswith("d") for k in keys)  # packed batches with π_ref precomputed
  # the packed batches and the padded fallback both occur, on the same steps on 1 and 8 devices
  assert 0 < one["padded_steps"].mean() < 1
  for k in keys:
    np.testing.assert_allclose(eight[k], one[k], atol=1e-5, rtol=1e-5, err_msg=k)


def _pool(n=12, t=5, seed=3):
  rng = np.random.default_rng(seed)
  return {
    "observations": rng.normal(size=(n, t, 4)).astype(np.float32),
    "actions": rng.uniform(-1, 1, (n, t, 2)).astype(np.float32),
    "mask": (np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32),
    "weight": np.ones(n, np.float32),
  }


@pytest.mark.parametrize(
  "step_level", [pytest.param(False, marks=pytest.mark.slow), True]
)  # sequence-level weights: make test-slow
def test_vmapped_seeds_train_like_separate_runs(step_level):
  """Three seeds stacked and trained in one vmapped program = the three seeds trained one by one:
  same parameters, same per-seed log rows, each seed evaluated on its own parameters."""
  graphdef, _, consts = split_policy(small_policy())
  logprob = make_logprob_fn(graphdef, consts)
  opt = optax.adam(1e-2)
  update = iwsft.make_update(
    logprob, opt, ObjectiveConfig("none" if step_level else "sequence", q_decay=0.9)
  )
  data, logits = _pool(), np.linspace(-1, 1, 12).astype(np.float32)
  seeds = [0, 1, 2]
  init = {s: iwsft.init_state(split_policy(small_policy(seed=s))[1], opt, 100 + s) for s in seeds}
  mesh = iwsft.make_mesh(1)
  kw = dict(
    sampling=iwsft.Sampling(30, 8, step_level=step_level, steps_per_dispatch=7), mesh=mesh, name="t"
  )
  norm = lambda p: {"param_norm": float(optax.global_norm(p))}

  single, single_rows = {}, {}
  for s in seeds:
    single_rows[s] = []
    single[s] = iwsft.fit(
      update,
      init[s],
      data,
      logits,
      **kw,
      hooks=iwsft.Hooks(logs=[single_rows[s].append], evaluate=[norm], eval_every=10),
    )
  rows = {s: [] for s in seeds}
  stacked = iwsft.stack_seeds([init[s] for s in seeds])
  assert iwsft.core.state.num_seeds(stacked) == 3 and iwsft.core.state.num_seeds(init[0]) is None
  out = iwsft.fit(
    update,
    stacked,
    data,
    logits,
    **kw,
    hooks=iwsft.Hooks(logs=[rows[s].append for s in seeds], evaluate=[norm] * 3, eval_every=10),
  )
  drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
  for i, s in enumerate(seeds):
    chex.assert_trees_all_close(
      iwsft.core.state.seed_slice(out.params, i), single[s].params, rtol=2e-4, atol=2e-5
    )
    np.testing.assert_array_equal(np.asarray(out.key[i]), np.asarray(single[s].key))
    assert len(rows[s]) == len(single_rows[s]) == 4 + 3 + 3  # evals at 0,10,20,30; chunks 7,3 x3
    for a, b in zip(drop_time(rows[s]), drop_time(single_rows[s])):
      assert a.keys() == b.keys() and a["step"] == b["step"]
      for k in a:
        if isinstance(a[k], float):
          np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-5, err_msg=k)
  # the seeds really differ (independent runs, not copies)
  assert not np.allclose(
    np.asarray(jax.tree.leaves(single[0].params)[0]),
    np.asarray(jax.tree.leaves(single[1].params)[0]),
  )


def test_seeds_split_over_8_devices_train_like_the_seeds_one_by_one(tmp_path):
  """8 seeds with their seed axis split over 8 devices (each device one seed, whole batches,
  packed, π_ref's log-probs precomputed) = each seed trained alone on one device; 5 seeds on 8
  devices use the 5 that share them evenly."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "..", "helpers", "seed_sharding_script.py")
  out = tmp_path / "seeds.npz"
  subprocess.run([sys.executable, script, str(out)], env=env, check=True, capture_output=True)
  got = np.load(out)
  assert int(got["devices_holding_seeds"]) == 8 and int(got["seeds_per_device"]) == 1
  assert int(got["five_seed_mesh"]) == 5
  keys = [k for k in got.files if k.startswith("sharded_")]
  assert len(keys) == 8 * 5  # 8 seeds x every leaf of the policy
  for k in keys:
    np.testing.assert_allclose(got[k], got[k.replace("sharded", "alone")], atol=1e-5, err_msg=k)
  assert not np.allclose(got["sharded_0_0"], got["sharded_1_0"])  # the seeds differ


def test_fsdp_splits_large_weights_and_trains_like_one_device():
  """8 devices as (data 2, fsdp 4) and (data 1, fsdp 8): each device holds 1/fsdp of the largest
  weight matrix and of its Adam moment, small leaves stay replicated, and losses and parameters
  match a 1-device run."""
  import json

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "..", "helpers", "fsdp_script.py")
  out = subprocess.run(
    [sys.executable, script], env=env, check=True, capture_output=True, text=True
  )
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  for fsdp in (4, 8):
    r = report[f"fsdp{fsdp}"]
    shape = r["big_shape"]
    assert len(r["big_shard_shapes"]) == 1
    shard = r["big_shard_shapes"][0]
    assert np.prod(shard) * fsdp == np.prod(shape)  # 1/fsdp of the matrix on each device
    assert r["big_devices"] == 8 and r["big_distinct_slices"] == fsdp  # replicated over "data"
    assert r["moment_shard_shapes"] == [shard]
    assert r["small_replicated"]
    np.testing.assert_allclose(r["loss"], r["loss_one"], rtol=1e-4)
    # Adam (lr 1e-3, 6 steps) moves weights by up to 6e-3; reduction order differs across meshes
    assert r["max_param_diff"] < 5e-4


def test_precomputed_reference_log_probs_give_the_same_update():
  """A batch carrying π_ref's log-probs ("logp_ref") updates exactly as one that makes the update
  compute them from ref_params."""
  params, opt, update, batch, logprob = _setup(q_decay=0.5)
  ref = jax.tree.map(lambda x: x + 0.05, params)
  state = iwsft.init_state(params, opt, 0, ref)
  with_ref = {**batch, "logp_ref": np.asarray(logprob(ref, batch))}
  a, ma = jax.jit(update)(state, batch)
  b, mb = jax.jit(update)(state, with_ref)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
