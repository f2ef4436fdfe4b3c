"""Recording Minari datasets locally (no internet needed).

A dataset is a sequence of (behaviour policy, number of episodes) parts recorded in one
environment; the reference scores of D4RL-style normalisation are stored with it. A part's
episodes run side by side in `width` environments, with one call of the behaviour per step of
them all.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import threadpoolctl

from iwsft import envs as envs_lib
from iwsft.io import workdir

# A behaviour policy, batched: (observations [N, O], one numpy Generator per row) -> actions [N, A].
# Row i may draw only from its own Generator, so an episode's data does not depend on its
# neighbours.
Behaviour = Callable[[np.ndarray, Sequence[np.random.Generator]], np.ndarray]


@dataclasses.dataclass
class Episode:
  """One recorded episode: observations [T+1, O], actions [T, A] (env units), rewards [T]."""

  observations: np.ndarray
  actions: np.ndarray
  rewards: np.ndarray
  terminated: bool
  truncated: bool
  seed: int


def pendulum_controller(noise_std: float) -> Behaviour:
  """A linear state-feedback controller for InvertedPendulum-v5 with Gaussian action noise.

  With noise_std <= 1 it balances for the whole episode; with 3 it falls within a few steps.
  Observation: [cart position, pole angle, cart velocity, pole angular velocity].
  """
  gains = np.array([1.0, 20.0, 2.0, 2.0])

  def act(obs, rngs):
    noise = np.array([r.standard_normal() for r in rngs])
    return np.clip(obs @ gains + noise_std * noise, -3.0, 3.0)[:, None]

  return act


def random_behaviour(action_space: gym.spaces.Box) -> Behaviour:
  low, high = action_space.low, action_space.high
  return lambda obs, rngs: np.stack([r.uniform(low, high) for r in rngs])


class _Slot:
  """One of the side-by-side environments and the episode it is recording."""

  def __init__(self, env_id: str, kwargs: dict):
    self.env, self.index = envs_lib.make(env_id, **kwargs), None

  def start(self, index: int, seed: int) -> None:
    self.index, self.seed, self.rng = index, seed + index, np.random.default_rng([seed, index])
    obs, _ = self.env.reset(seed=self.seed)
    self.obs, self.actions, self.rewards = [obs], [], []

  def step(self, action: np.ndarray) -> Episode | None:
    """Steps the environment; -> the finished episode when this step ended it."""
    obs, r, term, trunc, _ = self.env.step(action)
    self.obs.append(obs), self.actions.append(action), self.rewards.append(float(r))
    if not (term or trunc):
      return None
    obs, act, rew = np.array(self.obs), np.array(self.actions), np.array(self.rewards)
    episode = Episode(obs, act, rew, bool(term), bool(trunc), self.seed)
    self.index = None
    return episode


def record_episodes(
  env_id: str,
  behaviour: Behaviour,
  indices: Sequence[int],
  seed: int,
  width: int = 16,
  max_episode_steps: int | None = None,
  progress: Callable[[int], None] | None = None,
) -> list[Episode]:
  """Records one episode per index i (reset with seed + i, actions drawn from a Generator seeded
  with (seed, i)), `width` at a time. -> the episodes in the order of `indices`."""
  kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
  slots = [_Slot(env_id, kwargs) for _ in range(min(width, len(indices)))]
  todo, done = list(indices)[::-1], {}
  for slot in slots:
    slot.start(todo.pop(), seed)
  # A behaviour's matmuls are [width, 256]-sized: BLAS threads cost more than they save.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    _run(slots, behaviour, todo, done, seed, progress)
  for slot in slots:
    slot.env.close()
  return [done[i] for i in indices]


def _run(slots, behaviour, todo, done, seed, progress) -> None:
  """Steps the slots until every episode of `todo` is in `done`."""
  while live := [s for s in slots if s.index is not None]:
    obs = np.stack([s.obs[-1] for s in live])
    actions = np.asarray(behaviour(obs, [s.rng for s in live]), np.float32)
    for slot, action in zip(live, actions):
      index = slot.index
      if (episode := slot.step(action)) is not None:
        done[index] = episode
        if todo:
          slot.start(todo.pop(), seed)
        if progress:
          progress(1)


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
  width: int = 16,
):
  """Records the episodes of each (behaviour, n_episodes) part in turn and writes the dataset.

  The dataset's episode i is reset with seed + i and its actions drawn with a Generator seeded
  from (seed, i), so the same seed gives the same data. Returns the MinariDataset.
  """
  episodes, first = [], 0
  for behaviour, n_episodes in parts:
    indices = range(first, first + n_episodes)
    episodes += record_episodes(
      env_id, behaviour, indices, seed, width, max_episode_steps, progress
    )
    first += n_episodes
  env_kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
  return write_episodes(
    dataset_id,
    env_id,
    episodes,
    ref_min_score,
    ref_max_score,
    description,
    algorithm_name,
    env_kwargs=env_kwargs,
  )


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
  seed. eval_env: the environment (spec) meant for evaluation; by default the recording one.
  """
  import minari
  from minari.data_collector import EpisodeBuffer

  env = envs_lib.make(env_id, **(env_kwargs or {}))
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
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`author_email` is set to None")  # a project has no inbox
    return minari.create_dataset_from_buffers(
      dataset_id,
      buffers,
      env=env.spec,
      eval_env=eval_env or env.spec,  # minari warns when it is left to default to env
      algorithm_name=algorithm_name,
      description=description or f"{len(buffers)} episodes of {env_id} recorded by iwsft",
      author="iwsft",
      code_permalink=workdir.code_version(),
      **meta,
    )
