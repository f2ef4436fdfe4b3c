"""Dataset recording throughput: environment steps per second of iwsft.datasets.collect
with a SAC-sized actor (256, 256) as the behaviour, before and after batching, in one run.

  python benchmarks/collect_throughput.py [--env=HalfCheetah-v5] [--widths=1,4,16]

"per-step jax" is the previous collection: one environment, one jitted actor call and one PRNG key
per step. The other rows are `record_episodes` at each width: episodes side by side, one numpy
actor call per step of them all. HalfCheetah's episodes never terminate early (1,000 steps each),
so every row times the same steady state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from iwsft.datasets import collect, sac  # noqa: E402


def _actor(env_id: str):
  """-> (actor params, jitted act, action space) of a freshly initialised SAC actor."""
  env = gym.make(env_id)
  obs_dim, space = env.observation_space.shape[0], env.action_space
  init_state, _, act = sac.make_sac(obs_dim, space.shape[0], sac.SACConfig())
  return init_state().actor, act, space


def _scaled(space, fn):
  return lambda *a: space.low + (np.asarray(fn(*a)) + 1.0) * (space.high - space.low) / 2


def per_step_jax(env_id: str, episodes: int) -> float:
  params, act, space = _actor(env_id)

  def behaviour(obs, rngs):
    key = jax.random.key(int(rngs[0].integers(2**31)))
    return np.asarray(act(params, obs.astype(np.float32), key, False))

  return _steps_per_s(env_id, _scaled(space, behaviour), episodes, width=1)


def batched_numpy(env_id: str, episodes: int, width: int) -> float:
  params, _, space = _actor(env_id)
  return _steps_per_s(env_id, sac.numpy_behaviour(params, space), episodes, width)


def _steps_per_s(env_id, behaviour, episodes, width) -> float:
  collect.record_episodes(env_id, behaviour, range(1), seed=0, width=1)  # warm-up (compiles)
  t0 = time.perf_counter()
  eps = collect.record_episodes(env_id, behaviour, range(episodes), seed=0, width=width)
  return sum(len(e.actions) for e in eps) / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--env", default="HalfCheetah-v5")
  p.add_argument("--widths", default="1,4,16")
  p.add_argument("--episodes", type=int, default=16, help="episodes per measurement")
  args = p.parse_args()
  rows = [{"collection": "per-step jax", "env steps/s": per_step_jax(args.env, args.episodes)}]
  for w in (int(x) for x in args.widths.split(",")):
    rate = batched_numpy(args.env, args.episodes, w)
    rows.append({"collection": f"batched numpy, width {w}", "env steps/s": rate})
  for r in rows:
    r["vs per-step"] = r["env steps/s"] / rows[0]["env steps/s"]
  print(f"{args.env}: recording env steps/s, behaviour = SAC actor (256, 256)")
  print(common.table(rows, ["collection", "env steps/s", "vs per-step"]))
  print(f"-> {common.save('collect_throughput', {'env': args.env, 'rows': rows})}")


if __name__ == "__main__":
  main()
