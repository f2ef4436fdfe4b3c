"""Recording Minari datasets locally with `minari.DataCollector` (no internet needed).

A dataset is a sequence of (behaviour policy, number of episodes) parts recorded in one
environment; the reference scores of D4RL-style normalisation are stored with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def collect_dataset(
  dataset_id: str,
  env_id: str,
  parts: Sequence[tuple[Behaviour, int]],
  seed: int,
  ref_min_score: float | None = None,
  ref_max_score: float | None = None,
  description: str = "",
  algorithm_name: str = "iwsft",
  max_episode_steps: int | None = None,
  progress: Callable[[int], None] | None = None,
):
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
  dataset = env.create_dataset(
    dataset_id=dataset_id, algorithm_name=algorithm_name, description=description or None, **meta
  )
  env.close()
  return dataset


def biased_pendulum_controller(bias: float, noise_std: float = 0.5) -> Behaviour:
  """The competent controller plus a constant push `bias`: the behaviour-quality knob.

  On InvertedPendulum-v5 (1000 steps): bias 0 keeps the pole up (return 1000), bias 1.0 returns
  about 230 ± 130, bias 2.5 drops the pole within a few steps. The push has a fixed sign, so
  cloning a mixture inherits its average push: curation has something to fix.
  """
  good = pendulum_controller(noise_std)
  return lambda obs, rng: np.clip(good(obs, rng) + bias, -3.0, 3.0)


# Episodes per kind for each profile of the scripted pendulum family.
PENDULUM_PROFILES = {
  "small": {"random": 50, "medium": 40, "expert": 15, "medium-replay": 200},
  "full": {"random": 500, "medium": 1000, "expert": 1000, "medium-replay": 2000},
}


def pendulum_parts(kind: str, profile: str, action_space) -> list[tuple[Behaviour, int]]:
  """D4RL's recipe with a scripted learner whose push shrinks as it "trains".

  random: uniform actions; medium: push 1.0 (about a quarter of the expert's return); expert: no
  push; medium-replay: one episode per push on a schedule from 3.0 down to 1.0 (a learner's replay
  buffer up to medium); medium-expert: the medium and expert episodes together.
  """
  n = PENDULUM_PROFILES[profile]
  if kind == "random":
    return [(random_behaviour(action_space), n["random"])]
  if kind == "medium":
    return [(biased_pendulum_controller(1.0), n["medium"])]
  if kind == "expert":
    return [(biased_pendulum_controller(0.0), n["expert"])]
  if kind == "medium-replay":
    return [(biased_pendulum_controller(b), 1) for b in np.linspace(3.0, 1.0, n["medium-replay"])]
  if kind == "medium-expert":
    return pendulum_parts("medium", profile, action_space) + pendulum_parts(
      "expert", profile, action_space
    )
  raise ValueError(f"unknown kind {kind!r}")


def write_episodes(
  dataset_id: str,
  env_id: str,
  episodes,
  ref_min_score=None,
  ref_max_score=None,
  description: str = "",
  algorithm_name: str = "iwsft",
  env_kwargs: dict | None = None,
  eval_env=None,
):
  """Writes already-recorded episodes (e.g. a learner's training episodes) as a Minari dataset.

  episodes: objects with observations [T+1, O], actions [T, A], rewards [T], terminated, truncated,
  seed. eval_env: the environment (spec) meant for evaluation, when it is not the recording one.
  """
  import minari
  from minari.data_collector import EpisodeBuffer

  env = gym.make(env_id, **(env_kwargs or {}))
  buffers = []
  for i, e in enumerate(episodes):
    t = len(e.actions)
    buffers.append(
      EpisodeBuffer(
        id=i,
        seed=int(e.seed),
        observations=np.asarray(e.observations),
        actions=np.asarray(e.actions),
        rewards=list(map(float, e.rewards)),
        terminations=[False] * (t - 1) + [bool(e.terminated)],
        truncations=[False] * (t - 1) + [bool(e.truncated)],
      )
    )
  meta = {}
  if ref_min_score is not None and ref_max_score is not None:
    meta = {"ref_min_score": float(ref_min_score), "ref_max_score": float(ref_max_score)}
  return minari.create_dataset_from_buffers(
    dataset_id,
    buffers,
    env=env.spec,
    eval_env=eval_env,
    algorithm_name=algorithm_name,
    description=description or None,
    **meta,
  )
