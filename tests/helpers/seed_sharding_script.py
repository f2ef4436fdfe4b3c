"""Run in a subprocess with 8 forced CPU devices: 8 seeds trained with their seed axis split over
the devices, and the same 8 seeds trained one by one on one device; both saved to an npz.

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python tests/helpers/seed_sharding_script.py OUT.npz
"""

import sys

import jax
import numpy as np
import optax
from flax import nnx

import iwsft
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.core import packing
from iwsft.core.objectives import ObjectiveConfig

SEEDS = list(range(8))


def pool(n=13, t=6, o=4, a=2):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, t + 1, n)
  return {
    "observations": rng.normal(size=(n, t, o)).astype(np.float32),
    "actions": rng.uniform(-1, 1, (n, t, a)).astype(np.float32),
    "mask": (np.arange(t)[None] < lengths[:, None]).astype(np.float32),
    "weight": np.ones(n, np.float32),
  }


def main(out):
  data = pool()
  logits = np.linspace(-1, 1, len(data["weight"])).astype(np.float32)
  policies = [GaussianPolicy(4, 2, PolicyConfig(hidden=(16,)), rngs=nnx.Rngs(s)) for s in SEEDS]
  graphdef, _, consts = split_policy(policies[0])
  logprob = packing.markov_logprob(make_logprob_fn(graphdef, consts))
  opt = optax.adam(1e-2)
  update = iwsft.make_update(logprob, opt, ObjectiveConfig("sequence", q_decay=0.9), True)
  params = [split_policy(p)[1] for p in policies]
  refs = [jax.tree.map(lambda x: 0.9 * x, p) for p in params]  # π_ref differs from θ
  init = [iwsft.init_state(p, opt, 100 + s, r) for p, s, r in zip(params, SEEDS, refs)]
  sampling = iwsft.Sampling(12, 4, steps_per_dispatch=5, capacity=14)

  def train(states, mesh, by_seed):
    stacked = len(states) > 1
    state = iwsft.stack_seeds(states) if stacked else states[0]
    host_pool = iwsft.core.sharding.shard_pool(data, mesh)
    ref = iwsft.core.sharding.put_replicated(state.ref_params, mesh)
    seed_data = {"logp_ref": iwsft.pool_logprobs(logprob, ref, host_pool, mesh, stacked)}
    kw = dict(mesh=mesh, name="t", seed_data=seed_data, seeds_over_devices=by_seed)
    return iwsft.fit(update, state, host_pool, logits, sampling, **kw)

  sharded = train(init, iwsft.make_mesh(), by_seed=True)
  leaf = jax.tree.leaves(sharded.params)[0]
  saved = {
    "devices_holding_seeds": len(leaf.sharding.device_set),
    "seeds_per_device": leaf.addressable_shards[0].data.shape[0],
    "five_seed_mesh": iwsft.core.sharding.seed_mesh(iwsft.make_mesh(), 5).devices.size,
  }
  for i, s in enumerate(SEEDS):
    alone = train([init[i]], iwsft.make_mesh(1), by_seed=False)
    for j, (a, b) in enumerate(
      zip(
        jax.tree.leaves(iwsft.core.state.seed_slice(sharded.params, i)),
        jax.tree.leaves(alone.params),
      )
    ):
      saved[f"sharded_{s}_{j}"], saved[f"alone_{s}_{j}"] = np.asarray(a), np.asarray(b)
  np.savez(out, **saved)


if __name__ == "__main__":
  main(sys.argv[1])
