"""Policies trained by another library on iwsft's data, evaluated with iwsft's protocol.

The peer (d3rlpy, in its own venv: experiments/d3rlpy_offline.py) reads a dataset's transitions
from `write_transitions` and writes its deterministic actor as plain arrays; `read_actor` turns
them back into an `act(obs [N, O]) -> actions [N, A]` for control.evaluate, after checking its
forward pass against the peer's own predictions.
"""

from __future__ import annotations

import numpy as np

from iwsft.control import data as data_lib
from iwsft.errors import UserError


def transitions(dataset) -> dict[str, np.ndarray]:
  """Every step of a MinariDataset, flat and in episode order, the way d3rlpy's D4RL loader
  takes them: observations [S, O], actions [S, A], rewards [S], terminals [S] (1 where the episode
  terminated at that step), timeouts [S] (1 at the last step of an episode that did not)."""
  data_lib.check_spaces(dataset)
  space = dataset.action_space
  if not (np.all(space.low == -1.0) and np.all(space.high == 1.0)):
    raise UserError(
      f"dataset {dataset.spec.dataset_id!r}: the peers' tanh actors need actions in [-1, 1], "
      f"the space is [{space.low.min()}, {space.high.max()}]"
    )
  eps = data_lib.episodes_from_minari(dataset)  # the same reading and checks as iwsft's methods
  keep = eps.mask.astype(bool)
  ends = np.zeros_like(eps.mask)
  ends[np.arange(eps.num_episodes), eps.lengths - 1] = 1.0
  rewards, terminated = _rewards_and_ends(dataset, eps)
  terminals = ends * terminated[:, None]
  return {
    "observations": eps.observations[keep],
    "actions": eps.actions[keep],
    "rewards": rewards[keep],
    "terminals": terminals[keep].astype(np.float32),
    "timeouts": (ends - terminals)[keep].astype(np.float32),
  }


def _rewards_and_ends(dataset, eps) -> tuple[np.ndarray, np.ndarray]:
  """One more pass over the episodes: per-step rewards [N, T] padded like `eps`, and [N] 1.0
  where the episode terminated (0.0 where it was cut off)."""
  rewards = np.zeros(eps.mask.shape, np.float32)
  terminated = np.zeros(eps.num_episodes, np.float32)
  for i, e in enumerate(dataset.iterate_episodes()):
    rewards[i, : eps.lengths[i]] = np.asarray(e.rewards, np.float32).reshape(-1)
    terminated[i] = float(bool(e.terminations[-1]))
  return rewards, terminated


def write_transitions(dataset, path: str) -> int:
  """Writes `transitions(dataset)` to an .npz; returns the number of steps."""
  arrays = transitions(dataset)
  np.savez(path, **arrays)
  return len(arrays["rewards"])


def actor_forward(arrays: dict, obs: np.ndarray) -> np.ndarray:
  """tanh(last(relu(... relu(first((obs − mean) / scale))))): [N, O] -> [N, A], in float64."""
  x = (np.asarray(obs, np.float64) - arrays["obs_mean"]) / arrays["obs_scale"]
  n = sum(1 for k in arrays if k.startswith("w"))
  for i in range(n):
    x = x @ arrays[f"w{i}"].astype(np.float64) + arrays[f"b{i}"]
    if i < n - 1:
      x = np.maximum(x, 0.0)
  return np.tanh(x)


def read_actor(path: str, atol: float = 1e-4):
  """`act(obs [N, O]) -> actions [N, A]` from a peer's actor file, after checking that its forward
  pass reproduces the peer's own predictions on the stored sample (else UserError)."""
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  got = actor_forward(arrays, arrays["check_observations"])
  err = float(np.abs(got - arrays["check_actions"]).max())
  if err > atol:
    raise UserError(f"{path}: the actor's forward pass differs from the peer's by {err:.2g}")
  return lambda obs: actor_forward(arrays, obs).astype(np.float32)
