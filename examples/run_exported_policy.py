"""Drive an exported iwsft policy in gymnasium with jax alone (no iwsft import).

  python examples/run_exported_policy.py runs/demo/iw_sft/seed_0/policy [--episodes=3]

The directory holds policy.jaxexport (StableHLO: observation normalisation, the MLP and the
action scaling) and policy.json (the evaluation environment's spec and the shapes), as every
control run writes them.
"""

import argparse
import json
import os

import gymnasium as gym
import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("policy_dir")
  parser.add_argument("--episodes", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  with open(os.path.join(args.policy_dir, "policy.json")) as f:
    info = json.load(f)
  with open(os.path.join(args.policy_dir, "policy.jaxexport"), "rb") as f:
    act = jax.export.deserialize(bytearray(f.read())).call
  env = gym.make(gym.envs.registration.EnvSpec.from_json(info["env_spec"]))
  for i in range(args.episodes):
    obs, _ = env.reset(seed=args.seed + i)
    total, done = 0.0, False
    while not done:
      action = np.asarray(act(obs[None].astype(np.float32)))[0]
      obs, reward, terminated, truncated, _ = env.step(action)
      total, done = total + float(reward), terminated or truncated
    print(f"{info['env_id']} episode {i}: return {total:.1f}")
  env.close()


if __name__ == "__main__":
  main()
