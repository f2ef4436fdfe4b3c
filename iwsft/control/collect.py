"""Recording Minari datasets locally with `minari.DataCollector` (no internet needed).

A dataset is a sequence of (behaviour policy, number of episodes) parts recorded in one
environment; the reference scores of D4RL-style normalisation are stored with it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

# A behaviour policy: (observation [O], numpy Generator) -> action [A].
Behaviour = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def pendulum_controller(noise_std: float) -> Behaviour:
  """A linear state-feedback controller for InvertedPendulum-v5 with Gaussian action noise.

  With noise_std <= 1 it balances for the whole episode; with 3 it falls within a few steps.
  Observation: [cart position, pole angle, cart velocity, pole angular velocity].
  """
  gains = np.array([1.0, 20.0, 2.0, 2.0])

  def act(obs, rng):
    return np.clip([gains @ obs + noise_std * rng.standard_normal()], -3.0, 3.0)

  return act


def random_behaviour(action_space: gym.spaces.Box) -> Behaviour:
  low, high = action_space.low, action_space.high
  return lambda obs, rng: rng.uniform(low, high)


def collect_dataset(dataset_id: str, env_id: str, parts: Sequence[tuple[Behaviour, int]], seed: int,
                    ref_min_score: float | None = None, ref_max_score: float | None = None,
                    description: str = "", algorithm_name: str = "iwsft",
                    max_episode_steps: int | None = None, progress: Callable[[int], None] | None = None):
  """Records the episodes of each (behaviour, n_episodes) part in turn and writes the dataset.

  Episode i is reset with seed + i and its actions drawn with a Generator seeded from (seed, i),
  so the same seed gives the same data. Returns the MinariDataset.
  """
  import minari

  kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
  env = minari.DataCollector(gym.make(env_id, **kwargs), record_infos=False)
  i = 0
  for behaviour, n_episodes in parts:
    for _ in range(n_episodes):
      rng = np.random.default_rng([seed, i])
      obs, _ = env.reset(seed=seed + i)
      while True:
        obs, _, terminated, truncated, _ = env.step(np.asarray(behaviour(obs, rng), np.float32))
        if terminated or truncated:
          break
      i += 1
      if progress:
        progress(1)
  meta = {}
  if ref_min_score is not None and ref_max_score is not None:
    meta = {"ref_min_score": float(ref_min_score), "ref_max_score": float(ref_max_score)}
  dataset = env.create_dataset(dataset_id=dataset_id, algorithm_name=algorithm_name,
                               description=description or None, **meta)
  env.close()
  return dataset
