"""Evaluation throughput: environment steps per second with the policy in the loop, one env against
gymnasium vector envs of several sizes (what iwsft.control.evaluate does: one sub-env per episode).

  python benchmarks/eval_throughput.py [--env=Hopper-v5]

Each step is one batched policy call (the jitted deterministic action of a default-size Gaussian
policy) and one env step; finished sub-envs reset themselves (the vector env's autoreset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_act_fn, split_policy  # noqa: E402


def env_steps_per_s(env_id: str, num_envs: int, total_steps: int) -> float:
  envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
  obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
  policy = GaussianPolicy(obs_dim, act_dim, PolicyConfig(), rngs=nnx.Rngs(0))
  space = envs.single_action_space
  policy.set_normalisation(np.zeros(obs_dim), np.ones(obs_dim), space.low, space.high)
  graphdef, params, constants = split_policy(policy)
  act = make_act_fn(graphdef, constants)
  obs, _ = envs.reset(seed=0)
  np.asarray(act(params, obs.astype(np.float32)))  # compile
  iters = max(1, total_steps // num_envs)
  t0 = time.perf_counter()
  for _ in range(iters):
    obs, *_ = envs.step(np.asarray(act(params, obs.astype(np.float32)), np.float64))
  sec = time.perf_counter() - t0
  envs.close()
  return iters * num_envs / sec


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--env", default="Hopper-v5")
  p.add_argument("--num_envs", default="1,10,50")
  p.add_argument("--steps", type=int, default=20_000, help="env steps per measurement")
  args = p.parse_args()
  rows = []
  for n in (int(x) for x in args.num_envs.split(",")):
    rows.append({"envs": n, "env steps/s": env_steps_per_s(args.env, n, args.steps)})
  for r in rows:
    r["vs 1 env"] = r["env steps/s"] / rows[0]["env steps/s"]
  print(f"{args.env}: evaluation env steps/s with the policy in the loop (sync vector env)")
  print(common.table(rows, ["envs", "env steps/s", "vs 1 env"]))
  print(f"-> {common.save('eval_throughput', {'env': args.env, 'rows': rows})}")


if __name__ == "__main__":
  main()
