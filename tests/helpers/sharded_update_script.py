"""Run in a subprocess with N forced CPU devices: a few sharded updates, parameters saved to npz.

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python tests/helpers/sharded_update_script.py OUT.npz
"""

import sys

import jax
import numpy as np
from flax import nnx

import iwsft
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.objectives import ObjectiveConfig


def main(out):
  rng = np.random.default_rng(0)
  n, t, o, a = 21, 9, 5, 3  # 21 rows: the pool is padded to a multiple of 8 devices
  lengths = rng.integers(1, t + 1, n)
  data = {
    "observations": rng.normal(size=(n, t, o)).astype(np.float32),
    "actions": rng.uniform(-1, 1, (n, t, a)).astype(np.float32),
    "mask": (np.arange(t)[None] < lengths[:, None]).astype(np.float32),
    "weight": np.ones(n, np.float32),
  }
  graphdef, params, consts = split_policy(
    GaussianPolicy(o, a, PolicyConfig(hidden=(32, 32)), rngs=nnx.Rngs(0))
  )
  logprob = make_logprob_fn(graphdef, consts)
  opt = make_optimizer(StageConfig(steps=10, batch_size=16, learning_rate=1e-3))
  update = iwsft.make_update(
    logprob, opt, ObjectiveConfig("sequence", temperature=10.0, q_decay=0.9)
  )
  mesh = iwsft.make_mesh()
  # 1) explicit global batches through the jitted, sharded update(state, batch).
  ref = jax.tree.map(lambda x: x + 0.01, params)
  state = iwsft.core.sharding.put_replicated(iwsft.init_state(params, opt, 0, ref), mesh)
  rep, split = iwsft.core.sharding.replicated(mesh), iwsft.core.sharding.batch_sharded(mesh)
  step = jax.jit(update, in_shardings=(rep, split), out_shardings=(rep, rep))
  for i in range(4):
    idx = np.random.default_rng(i).integers(0, n, 16)
    state, metrics = step(state, jax.device_put({k: v[idx] for k, v in data.items()}, split))
  # 2) in-graph sampling, several steps per dispatch.
  state2 = iwsft.core.sharding.put_replicated(iwsft.init_state(params, opt, 1, ref), mesh)
  steps = iwsft.make_train_steps(update, mesh, iwsft.Sampling(4, 16), 4)
  logits = np.linspace(-1.0, 1.0, n).astype(np.float32)
  state2, metrics2 = steps(
    state2,
    iwsft.core.sharding.shard_pool(data, mesh),
    iwsft.core.sharding.put_replicated(logits, mesh),
  )
  # 3) step-level batches from the same pool.
  state3 = iwsft.core.sharding.put_replicated(iwsft.init_state(params, opt, 2, ref), mesh)
  steps3 = iwsft.make_train_steps(update, mesh, iwsft.Sampling(4, 16, step_level=True), 4)
  state3, metrics3 = steps3(
    state3,
    iwsft.core.sharding.shard_pool(data, mesh),
    iwsft.core.sharding.put_replicated(logits, mesh),
  )
  # 4) packed episode batches (capacity below the padded 16 x 9 slots) with π_ref precomputed.
  packed_logprob = iwsft.core.packing.markov_logprob(logprob)
  update4 = iwsft.make_update(
    packed_logprob, opt, ObjectiveConfig("sequence", temperature=10.0, q_decay=0.9)
  )
  pool = iwsft.core.sharding.shard_pool(data, mesh)
  state4 = iwsft.core.sharding.put_replicated(iwsft.init_state(params, opt, 1, ref), mesh)
  seed_data = {"logp_ref": iwsft.pool_logprobs(packed_logprob, state4.ref_params, pool, mesh)}
  steps4 = iwsft.make_train_steps(update4, mesh, iwsft.Sampling(8, 16, capacity=56), 8)
  state4, metrics4 = steps4(
    state4, pool, iwsft.core.sharding.put_replicated(logits, mesh), seed_data
  )
  leaves = {f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state.params))}
  leaves.update({f"b{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state2.params))})
  leaves.update({f"q{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state2.q_params))})
  leaves.update({f"c{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state3.params))})
  leaves.update({f"d{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state4.params))})
  leaves["loss"] = np.asarray(metrics2["loss"])
  leaves["loss_packed"] = np.asarray(metrics4["loss"])
  leaves["padded_steps"] = np.asarray(metrics4["batch/padded"])
  leaves["loss_steps"] = np.asarray(metrics3["loss"])
  leaves["devices"] = np.array(len(jax.devices()))
  np.savez(out, **leaves)


if __name__ == "__main__":
  main(sys.argv[1])
