"""Policy evaluation in the dataset's environment with D4RL-style normalised scores.

Runs N episodes at once in a gymnasium vector env (one sub-env per episode, each stopped at its
first episode end), acting with a batched deterministic policy.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

from iwsft import envs as envs_lib


def normalised_score(returns, ref_min: float | None, ref_max: float | None):
  """100 · (R − ref_min) / (ref_max − ref_min), or None without reference scores."""
  if ref_min is None or ref_max is None or ref_max == ref_min:
    return None
  return 100.0 * (np.asarray(returns, np.float64) - ref_min) / (ref_max - ref_min)


def run_episodes(
  act: Callable[[np.ndarray], np.ndarray],
  env_spec: gym.envs.registration.EnvSpec,
  num_episodes: int,
  seed: int,
) -> np.ndarray:
  """Returns [num_episodes] undiscounted returns of `act(obs [N, O]) -> actions [N, A]`."""
  envs = envs_lib.make_vec(env_spec, num_episodes)
  try:
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(num_episodes)
    running = np.ones(num_episodes, bool)
    while running.any():
      action = np.asarray(act(obs.astype(np.float32)), np.float64)
      obs, reward, terminated, truncated, _ = envs.step(action)
      returns += np.where(running, reward, 0.0)
      running &= ~(terminated | truncated)
    return returns
  finally:
    envs.close()


def evaluate(
  act, env_spec, num_episodes: int, seed: int, ref_min: float | None, ref_max: float | None
) -> dict[str, float | None]:
  """Mean/std of return and of the normalised score ×100 (None when reference scores are
  missing)."""
  returns = run_episodes(act, env_spec, num_episodes, seed)
  score = normalised_score(returns, ref_min, ref_max)
  return {
    "return_mean": float(returns.mean()),
    "return_std": float(returns.std()),
    "normalised_score": None if score is None else float(score.mean()),
    "normalised_score_std": None if score is None else float(score.std()),
    "episodes": int(num_episodes),
  }
