"""LoRA: the adapters start as the base model, merge into it exactly (checked against numpy), train
alone on a frozen base through the shared update step, and run through the language pipeline."""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LM_TINY, QWEN2_TINY, lm_command_error
from flax import nnx

from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.state import init_state
from iwsft.core.step import make_update
from iwsft.io import checkpoint
from iwsft.lm import lora
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, param_count, path_keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = LMConfig(**QWEN2_TINY, max_len=16)
TOKENS = jax.random.randint(jax.random.key(1), (3, 12), 0, 50)


@pytest.fixture(scope="module")
def base():
  return nnx.split(Transformer(BASE, rngs=nnx.Rngs(0)))


def _random_adapters(adapters, seed):
  """Adapters with B no longer zero, as after training."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  )


def test_fresh_adapters_are_the_base_model(base):
  graphdef, params = base
  cfg = lora.with_lora(BASE, 4, 8.0, ("qkv", "down"))
  lora_graph, adapters = lora.adapters(cfg, seed=3)
  assert param_count(adapters) == 2 * (32 * 4 + 4 * 64) + 2 * (48 * 4 + 4 * 32)
  want = make_logprob_fn(graphdef)(params, {"tokens": TOKENS})
  got = make_logprob_fn(lora_graph)({"trained": adapters, "frozen": params}, {"tokens": TOKENS})
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("targets", [("qkv", "proj", "up", "down"), ("up",)])
def test_merged_weights_are_the_adapted_model(base, targets):
  """The merged model's log-probs equal the adapted model's, and each merged kernel is
  W + (alpha / rank) · A B computed in numpy; everything else is the base's, bit for bit."""
  graphdef, params = base
  cfg = lora.with_lora(BASE, 3, 6.0, targets)
  lora_graph, adapters = lora.adapters(cfg, seed=0)
  trained = _random_adapters(adapters, 1)
  merged = lora.merge(lora_graph, trained, params)
  adapted = make_logprob_fn(lora_graph)({"trained": trained, "frozen": params}, {"tokens": TOKENS})
  chex.assert_trees_all_close(
    make_logprob_fn(graphdef)(merged, {"tokens": TOKENS}), adapted, atol=1e-5
  )
  before, after = nnx.to_pure_dict(params), nnx.to_pure_dict(merged)
  ad = nnx.to_pure_dict(trained)
  for i in range(BASE.n_layers):
    for name in ("qkv", "proj", "up", "down"):
      w = np.asarray(before["blocks"][i][name]["kernel"], np.float64)
      if name in targets:
        a = np.asarray(ad["blocks"][i][f"{name}_lora"]["lora_a"], np.float64)
        b = np.asarray(ad["blocks"][i][f"{name}_lora"]["lora_b"], np.float64)
        w = w + 2.0 * a @ b
      np.testing.assert_allclose(after["blocks"][i][name]["kernel"], w, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(after["embed"], before["embed"])
  chex.assert_trees_all_equal(after["blocks"][0]["norm1"], before["blocks"][0]["norm1"])


def test_an_update_trains_the_adapters_only_with_adapter_sized_state(base):
  """The shared update on a state whose base is frozen: the base stays bit for bit; the
  optimiser's moments, q and π_ref are adapter-sized; the step is the one an optax step on the
  adapters alone takes with the base held as a constant."""
  graphdef, params = base
  cfg = lora.with_lora(BASE, 2, 4.0, ("qkv", "proj", "up", "down"))
  lora_graph, adapters = lora.adapters(cfg, seed=0)
  adapters = _random_adapters(adapters, 2)
  objective = ObjectiveConfig(temperature=1.0, w_max=10.0, self_normalise=False, q_decay=0.5)
  logprob_fn = make_logprob_fn(lora_graph)
  optimizer = optax.adam(1e-2)
  batch = {
    "tokens": TOKENS,
    "mask": jnp.ones(TOKENS.shape).at[:, :4].set(0.0),
    "weight": jnp.ones(TOKENS.shape[0]),
  }
  state = init_state(adapters, optimizer, 0, frozen=params)
  n = param_count(adapters)
  assert param_count(state.q_params) == param_count(state.ref_params) == n
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * n + 1  # mu, nu, count
  update = make_update(logprob_fn, optimizer, objective, track_bounds=False)
  new, _ = jax.jit(update)(state, batch)
  chex.assert_trees_all_equal(new.frozen, params)

  # the same step with the base closed over as a constant: the adapters alone are the model
  closed = lambda p, b: logprob_fn({"trained": p, "frozen": params}, b)
  plain = init_state(adapters, optimizer, 0)
  want, _ = jax.jit(make_update(closed, optimizer, objective, track_bounds=False))(plain, batch)
  chex.assert_trees_all_close(new.params, want.params, atol=1e-7)
  chex.assert_trees_all_close(new.q_params, want.q_params, atol=1e-7)
  assert not np.allclose(np.asarray(jax.tree.leaves(new.params)[0]), jax.tree.leaves(adapters)[0])


BASE_TINY = LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=48)


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_the_language_pipeline_fine_tunes_adapters_and_saves_the_merged_model(tmp_path):
  """--config.model.lora_rank: the fine-tuned model is saved in the base layout; only the target
  projections' kernels moved from π_ref."""
  work = tmp_path / "lora"
  seed_dir = work / "seed_0"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "experiments", "lm.py"),
    f"--workdir={work}",
    "--config.model.lora_rank=4",
    "--config.model.lora_targets=qkv",
    "--config.model.lora_targets=down",
    "--config.finetune.learning_rate=1e-2",
    *LM_TINY,
    "--config.model.n_layers=2",
    "--config.methods=iw_sft",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  template = nnx.split(Transformer(BASE_TINY, rngs=nnx.Rngs(0)))[1]
  ref = nnx.to_pure_dict(checkpoint.restore_state(str(seed_dir / "reference" / "params"), template))
  tuned = nnx.to_pure_dict(checkpoint.restore_state(str(seed_dir / "iw_sft" / "params"), template))
  moved = {
    "/".join(map(str, path_keys(path)))
    for path, x in jax.tree_util.tree_flatten_with_path(tuned)[0]
    if not np.array_equal(x, _at(ref, path_keys(path)))
  }
  assert moved == {f"blocks/{i}/{n}/kernel" for i in (0, 1) for n in ("qkv", "down")}
  assert (seed_dir / "result.json").exists()


@pytest.mark.parametrize(
  "flag, needle",
  [
    ("--config.model.lora_rank=-1", "model.lora_rank must be >= 0"),
    ("--config.model.lora_targets=gate", "model.lora_targets must be a non-empty subset of"),
    ("--config.model.train_layers=1", "choose one way to fine-tune"),
  ],
)
def test_bad_lora_settings_are_one_line_exit_2(tmp_path, flag, needle):
  assert needle in lm_command_error(tmp_path / "w", "--config.model.lora_rank=2", flag)


def test_adapter_gradients_are_the_same_with_rematerialised_blocks(base):
  """remat recomputes a block from its merged state (adapters and frozen base): the same
  gradients as without it."""
  graphdef, params = base
  grads = []
  for remat in ("none", "full"):
    cfg = lora.with_lora(dataclasses.replace(BASE, remat=remat), 2, 4.0, ("qkv", "up"))
    lora_graph, adapters = lora.adapters(cfg, seed=0)
    fn = make_logprob_fn(lora_graph)
    loss = lambda a, f, fn=fn: fn({"trained": a, "frozen": f}, {"tokens": TOKENS}).sum()
    grads.append(jax.jit(jax.grad(loss))(_random_adapters(adapters, 5), params))
  chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5)


def test_training_reads_the_frozen_base_in_place(base, tmp_path):
  """fit on a LoRA state: the base is neither copied nor donated (one copy of the base model, the
  caller's), and the adapters train."""
  from iwsft.core.loop import Hooks, fit
  from iwsft.core.sharding import make_mesh
  from iwsft.core.step import Sampling

  graphdef, params = base
  lora_graph, adapters = lora.adapters(lora.with_lora(BASE, 2, 4.0, ("qkv", "up")), seed=0)
  optimizer = optax.adam(1e-2)
  objective = ObjectiveConfig(temperature=1.0, w_max=10.0, self_normalise=False, q_decay=0.0)
  update = make_update(make_logprob_fn(lora_graph), optimizer, objective, track_bounds=False)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (8, 12), 0, 50), np.int32)
  data = {"tokens": tokens, "mask": np.ones(tokens.shape, np.float32), "weight": np.ones(8)}
  state = init_state(adapters, optimizer, 0, keep_q=False, frozen=params)
  sampling = Sampling(4, 2, steps_per_dispatch=2)
  hooks = lambda: Hooks(checkpoints=checkpoint.TrainCheckpoints(str(tmp_path / "ckpt"), 2, 2))
  run = lambda s: fit(
    update, s, data, np.zeros(8), sampling, mesh=make_mesh(1), name="lora", hooks=hooks()
  )
  out = run(state)
  pointers = lambda t: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(t)]
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  assert pointers(out.frozen) == pointers(params)
  assert not np.allclose(jax.tree.leaves(out.params)[1], jax.tree.leaves(adapters)[1])
  # checkpoints hold the trained part only: a rerun resumes the adapters at the last step and
  # reads the base its caller gives, here a copy
  again = jax.tree.map(jnp.array, params)
  resumed = run(init_state(adapters, optimizer, 0, keep_q=False, frozen=again))
  assert int(resumed.step) == 4 and pointers(resumed.frozen) == pointers(again)
  chex.assert_trees_all_equal(resumed.params, out.params)
