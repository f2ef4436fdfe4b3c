"""Minari offline datasets -> padded episode arrays for the shared update step.

Episodes are kept whole (iw-SFT weights whole trajectories): arrays [N, T_max, ...] padded at the
end with a step mask, plus per-episode return and length.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from iwsft.core import sharding
from iwsft.datasets import shipped
from iwsft.datasets.local import datasets_path
from iwsft.errors import UserError
from iwsft.io import distributed


@dataclasses.dataclass
class Episodes:
  """Host-side episodes of one dataset.

  observations: [N, T, O] float32 (s_t for t < length, zeros after)
  actions:      [N, T, A] float32
  mask:         [N, T]    float32, 1 for the first `length` steps
  returns:      [N]       float64, undiscounted episode return
  lengths:      [N]       int64
  episode_ids:  [N]       int64, Minari episode ids
  """

  observations: np.ndarray
  actions: np.ndarray
  mask: np.ndarray
  returns: np.ndarray
  lengths: np.ndarray
  episode_ids: np.ndarray

  @property
  def num_episodes(self) -> int:
    return len(self.returns)

  @property
  def num_steps(self) -> int:
    return int(self.lengths.sum())

  def device_data(self, weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The batch layout of core.step: observations, actions, mask, weight [N] (default 1)."""
    w = np.ones(self.num_episodes, np.float32) if weight is None else weight.astype(np.float32)
    return {
      "observations": self.observations,
      "actions": self.actions,
      "mask": self.mask,
      "weight": w,
    }


def load_dataset(dataset_id: str, download: bool = False):
  """The MinariDataset for an id: local, else installed from the project's shipped copy
  (datasets/shipped.py), else downloaded when asked; a UserError lists the local ids."""
  import minari

  local = sorted(minari.list_local_datasets())
  if dataset_id not in local and shipped.install(dataset_id, datasets_path()):
    local.append(dataset_id)
  if dataset_id not in local:
    if not download:
      shown = ", ".join(local) if local else "none"
      raise UserError(
        f"dataset {dataset_id!r} is not in {datasets_path()} (local ids: {shown}); "
        "build it with experiments/make_datasets.py or pass --download"
      )
    _check_remote(dataset_id)
    try:
      minari.download_dataset(dataset_id)
    except Exception as e:  # network errors, unknown remote ids
      raise UserError(
        f"could not download {dataset_id!r}: {type(e).__name__}: {e}".splitlines()[0]
      ) from e
  try:
    return minari.load_dataset(dataset_id)
  except Exception as e:
    raise UserError(
      f"could not read dataset {dataset_id!r}: {type(e).__name__}: {e}".splitlines()[0]
    ) from e


def _check_remote(dataset_id: str, timeout: float = 5.0) -> None:
  """Fails in one line, before Minari's client retries for half a minute, when the remote that
  holds the dataset (MINARI_REMOTE, Minari's default hf://farama-minari) cannot be reached."""
  import socket
  from urllib.parse import urlparse

  remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
  kind = remote.split("://", 1)[0]
  if kind == "hf":
    try:
      from huggingface_hub import constants
    except ImportError:
      raise UserError("downloading needs Minari's hf extra: pip install 'minari[hf]'") from None
    url = urlparse(constants.ENDPOINT)
  elif kind == "gcp":
    url = urlparse("https://storage.googleapis.com")
  else:
    return
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise UserError(
      f"cannot download {dataset_id!r}: Minari's remote {remote} ({url.hostname}:{port}) is "
      f"unreachable ({e.strerror or e}); build datasets locally with experiments/make_datasets.py"
    ) from None


def check_spaces(dataset) -> tuple[int, int]:
  """(observation dims, action dims) of a dataset with episodes and flat Box spaces; else
  UserError."""
  import gymnasium as gym

  name = dataset.spec.dataset_id
  if dataset.total_episodes == 0:
    raise UserError(f"dataset {name!r} has no episodes")
  if not isinstance(dataset.action_space, gym.spaces.Box):
    raise UserError(f"dataset {name!r}: only continuous (Box) action spaces are supported")
  if not isinstance(dataset.observation_space, gym.spaces.Box):
    raise UserError(f"dataset {name!r}: only flat (Box) observation spaces are supported")
  return int(np.prod(dataset.observation_space.shape)), int(np.prod(dataset.action_space.shape))


def episodes_from_minari(dataset, indices=None) -> Episodes:
  """Reads the episodes at `indices` (all by default, in order) of a MinariDataset into padded
  arrays, checking shapes and values. An empty `indices` gives zero episodes."""
  name = dataset.spec.dataset_id
  obs_dim, act_dim = check_spaces(dataset)
  if indices is not None and len(indices) == 0:
    z = lambda *shape: np.zeros(shape, np.float32)
    return Episodes(
      z(0, 1, obs_dim),
      z(0, 1, act_dim),
      z(0, 1),
      np.zeros(0),
      np.zeros(0, np.int64),
      np.zeros(0, np.int64),
    )
  eps = list(dataset.iterate_episodes(None if indices is None else [int(i) for i in indices]))
  lengths = np.array([len(e.actions) for e in eps], np.int64)
  if indices is None and lengths.sum() == 0:
    raise UserError(f"dataset {name!r} has no steps")
  n, t = len(eps), max(1, int(lengths.max()))
  obs = np.zeros((n, t, obs_dim), np.float32)
  act = np.zeros((n, t, act_dim), np.float32)
  mask = np.zeros((n, t), np.float32)
  rets = np.zeros(n, np.float64)
  for i, e in enumerate(eps):
    k = lengths[i]
    o = np.asarray(e.observations, np.float64).reshape(k + 1, -1)
    a = np.asarray(e.actions, np.float64).reshape(k, -1) if k else np.zeros((0, act_dim))
    r = np.asarray(e.rewards, np.float64).reshape(-1)
    if o.shape[1] != obs_dim:
      raise UserError(
        f"dataset {name!r}, episode {e.id}: observations have {o.shape[1]} dims, "
        f"space says {obs_dim}"
      )
    if a.shape[1] != act_dim:
      raise UserError(
        f"dataset {name!r}, episode {e.id}: actions have {a.shape[1]} dims, space says {act_dim}"
      )
    for what, x in (("observations", o), ("actions", a), ("rewards", r)):
      if not np.all(np.isfinite(x)):
        raise UserError(f"dataset {name!r}, episode {e.id}: {what} contain NaN or inf")
    obs[i, :k], act[i, :k], mask[i, :k] = o[:k], a, 1.0
    rets[i] = r.sum()
  ids = np.array([e.id for e in eps], np.int64)
  return Episodes(obs, act, mask, rets, lengths, ids)


def check_matches_env(dataset, env_action_space, env_observation_space, name: str) -> None:
  """Raises a UserError when the data's action/observation sizes differ from the environment's."""
  a = int(np.prod(env_action_space.shape))
  o = int(np.prod(env_observation_space.shape))
  obs_dim, act_dim = check_spaces(dataset)
  if act_dim != a:
    raise UserError(f"dataset {name!r}: actions have {act_dim} dims, the environment takes {a}")
  if obs_dim != o:
    raise UserError(
      f"dataset {name!r}: observations have {obs_dim} dims, the environment gives {o}"
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Random split of n episode indices into sorted (train, validation); validation is None when
  val_fraction is 0. Needs only n, so every process computes the same split without reading data."""
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
  n_val = int(round(val_fraction * n))
  if n_val == 0:
    return np.arange(n), None
  if n - n_val < 1:
    raise UserError(f"val_fraction {val_fraction} leaves no training episodes out of {n}")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclasses.dataclass
class Share:
  """This process's share of a dataset's training episodes, plus the facts every process needs.

  episodes: the process's real rows of the sampling pool (sharding.pool_rows), padded to the longest
            training episode of any process: [R, T, ...]
  rows:     [R] their indices among the N training episodes
  num_rows: N, the training episodes of all processes together
  returns:  [N] every training episode's return (curation ranks them all)
  lengths:  [N] every training episode's length
  obs_mean, obs_std: [O] observation statistics over every real training step
  """

  episodes: Episodes
  rows: np.ndarray
  num_rows: int
  returns: np.ndarray
  lengths: np.ndarray
  obs_mean: np.ndarray
  obs_std: np.ndarray

  def local(self, per_episode: np.ndarray) -> np.ndarray:
    """This process's entries [R] of a per-training-episode array [N]."""
    return per_episode[self.rows]

  def pool(self, weight: np.ndarray, mesh):
    """The global sampling pool for core.loop.fit, from this process's rows; weight: [N]."""
    return sharding.put_pool(self.episodes.device_data(self.local(weight)), self.num_rows, mesh)


def read_share(dataset, train_idx: np.ndarray, mesh) -> Share:
  """Reads only this process's share (sharding.pool_rows) of the training episodes train_idx [N].

  The per-episode returns and lengths, the longest episode and the observation statistics are
  combined over processes (jax.distributed collectives); with one process this equals reading
  every training episode and computing them directly.
  """
  n = len(train_idx)
  rows, _ = sharding.pool_rows(n, mesh)
  mine = rows[rows < n]
  eps = episodes_from_minari(dataset, train_idx[mine])
  t = int(distributed.allgather(np.array(eps.mask.shape[1])).max())
  pad = lambda x: np.pad(x, [(0, 0), (0, t - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  eps = Episodes(
    pad(eps.observations),
    pad(eps.actions),
    pad(eps.mask),
    eps.returns,
    eps.lengths,
    eps.episode_ids,
  )
  returns, lengths = np.zeros(n), np.zeros(n, np.int64)
  width = len(rows)  # the same in every process
  got_r = distributed.allgather(np.pad(eps.returns, (0, width - len(mine))))
  got_l = distributed.allgather(np.pad(eps.lengths, (0, width - len(mine))))
  for p in range(len(got_r)):
    r, _ = sharding.pool_rows(n, mesh, process=p)
    keep = r < n
    returns[r[keep]], lengths[r[keep]] = got_r[p][keep], got_l[p][keep]
  # Two passes, as np.mean / np.std compute them (identical numerics for one process).
  obs = eps.observations[eps.mask.astype(bool)].astype(np.float64)
  count = int(lengths.sum())
  if count == 0:
    raise UserError(f"dataset {dataset.spec.dataset_id!r} has no steps")
  mean = distributed.sum_over_processes(obs.sum(axis=0)) / count
  var = distributed.sum_over_processes(((obs - mean) * (obs - mean)).sum(axis=0)) / count
  return Share(
    eps, mine, n, returns, lengths, mean.astype(np.float32), np.sqrt(var).astype(np.float32)
  )


def reference_scores(dataset) -> tuple[float | None, float | None]:
  """(ref_min_score, ref_max_score) from the dataset's metadata, None where missing."""
  meta = dataset.storage.metadata
  lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
  return (None if lo is None else float(lo)), (None if hi is None else float(hi))
