"""Building the project's own D4RL-style Minari datasets (random, medium, medium-replay, expert,
medium-expert) with reference scores, for experiments/make_datasets.py and the demo.

Ids: iwsft/<env>-small/<kind>-v0 for the small profile, iwsft/<env>/<kind>-v0 for full.
"""

import os
import pickle
import time

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from iwsft.control.datasets import collect
from iwsft.errors import UserError
from iwsft.io.report import format_table

ENVS = {
  "pendulum": "InvertedPendulum-v5",
  "hopper": "Hopper-v5",
  "halfcheetah": "HalfCheetah-v5",
  "walker2d": "Walker2d-v5",
}
KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert")

# Behaviour-policy training and episodes per kind for the SAC-made locomotion families.
# small: about 2.5 minutes on 2 cores for Hopper (measured); full: see the README's dataset table.
SAC_PROFILES = {
  "small": {
    "sac": {
      "total_steps": 30_000,
      "start_steps": 5_000,
      "snapshot_every": 2_500,
      "hidden": (256, 256),
    },
    "episodes": {"random": 20, "medium": 20, "expert": 10},
  },
  "full": {
    "sac": {
      "total_steps": 300_000,
      "start_steps": 10_000,
      "snapshot_every": 10_000,
      "hidden": (256, 256),
    },
    "episodes": {"random": 1000, "medium": 1000, "expert": 1000},
  },
}


def dataset_id(env: str, profile: str, kind: str) -> str:
  return f"iwsft/{env}{'-small' if profile == 'small' else ''}/{kind}-v0"


class _Pendulum:
  """The scripted pendulum family: behaviours from iwsft.control.collect."""

  algorithm = "scripted controller"
  train_seconds = None

  def __init__(self, env_id, profile, seed):
    self.space = gym.make(env_id).action_space
    self.profile = profile

  def prepare(self, kind):
    pass

  def parts(self, kind):
    return collect.pendulum_parts(kind, self.profile, self.space)

  def recorded(self, kind):
    return None


class _SACFamily:
  """Locomotion: SAC is trained once (lazily); expert is the best snapshot, medium the snapshot
  whose
  evaluation return is closest to a third of the way from the random data's return to the expert's
  (D4RL's "a third of the expert", made meaningful for environments with negative returns), and
  medium-replay every training episode up to the medium snapshot."""

  algorithm = "SAC"

  def __init__(self, env_id, profile, seed, cache_path=None):
    self.env_id, self.profile, self.seed = env_id, profile, seed
    env = gym.make(env_id)
    self.space, self.obs_dim = env.action_space, env.observation_space.shape[0]
    self.cache_path = cache_path
    self._trained = None
    self.train_seconds = None  # wall time of the SAC training, once trained or read from the cache
    self.random_return = None  # set by build() once the random data exists

  def prepare(self, kind):
    if kind != "random":
      self._train()

  def _train(self):
    if self._trained is None:
      from iwsft.control.datasets import sac

      p = SAC_PROFILES[self.profile]
      cfg = sac.SACConfig(seed=self.seed, **p["sac"])
      _, _, act = sac.make_sac(self.obs_dim, self.space.shape[0], cfg)
      cached = _read_cache(self.cache_path, cfg)
      if cached is None:
        t0 = time.time()
        snaps, episodes, act = sac.train_sac(self.env_id, cfg)
        self.train_seconds = time.time() - t0
        _write_cache(self.cache_path, cfg, snaps, episodes, self.train_seconds)
      else:
        snaps, episodes, self.train_seconds = cached
      expert = max(snaps, key=lambda s: s.eval_return)
      before = [s for s in snaps if s.step <= expert.step]
      lo = self.random_return if self.random_return is not None else 0.0
      target = lo + (expert.eval_return - lo) / 3
      medium = min(before, key=lambda s: abs(s.eval_return - target))
      self._trained = {"expert": expert, "medium": medium, "episodes": episodes, "act": act}
    return self._trained

  def _actor(self, snap):
    import jax

    t = self._train()
    low, high = self.space.low, self.space.high

    def behaviour(obs, rng):
      key = jax.random.key(int(rng.integers(2**31)))
      a = np.asarray(t["act"](snap.actor, obs[None].astype(np.float32), key, False))[0]
      return low + (a + 1.0) * (high - low) / 2

    return behaviour

  def parts(self, kind):
    n = SAC_PROFILES[self.profile]["episodes"]
    if kind == "random":
      return [(collect.random_behaviour(self.space), n["random"])]
    if kind in ("medium", "expert"):
      return [(self._actor(self._train()[kind]), n[kind])]
    if kind == "medium-expert":
      return self.parts("medium") + self.parts("expert")
    return None

  def recorded(self, kind):
    if kind != "medium-replay":
      return None
    t = self._train()
    return [e for e in t["episodes"] if e.end_step <= t["medium"].step]


def _behaviour_cache(env: str, profile: str, seed: int) -> str:
  """Where a family's trained SAC (snapshots and training episodes) is kept, so that building a
  missing kind later, or after an interruption, does not train again. A hidden directory, which
  Minari does not list as a dataset."""
  import minari.storage.datasets_root_dir as root

  return os.path.join(
    root.get_dataset_path(), ".iwsft-behaviour", f"{env}-{profile}-seed{seed}.pkl"
  )


def _read_cache(path, cfg):
  if path is None or not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    saved = pickle.load(f)
  if saved["config"] != cfg:  # another recipe: train again
    return None
  return saved["snapshots"], saved["episodes"], saved["seconds"]


def _write_cache(path, cfg, snapshots, episodes, seconds):
  if path is None:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    pickle.dump(
      {"config": cfg, "snapshots": snapshots, "episodes": episodes, "seconds": seconds}, f
    )
  os.replace(path + ".tmp", path)


def build(env: str, profile: str, kinds, seed: int, force: bool) -> list[dict]:
  """Builds (or reuses) the datasets; returns one summary row per dataset."""
  import minari

  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise UserError(f"unknown dataset kinds: {', '.join(sorted(unknown))}")
  if env not in ENVS:
    raise UserError(f"unknown environment {env!r}; choose from {', '.join(ENVS)}")
  env_id = ENVS[env]
  if env == "pendulum":
    family = _Pendulum(env_id, profile, seed)
  else:
    family = _SACFamily(env_id, profile, seed, _behaviour_cache(env, profile, seed))
  # Reference scores need the random and expert data, so they are built first.
  order = ["random", "expert"] + [k for k in KINDS if k not in ("random", "expert")]
  needed = [k for k in order if k in kinds or k in ("random", "expert")]
  local = minari.list_local_datasets()
  rows, refs = [], {}
  for kind in needed:
    did = dataset_id(env, profile, kind)
    if did in local and force:
      minari.delete_dataset(did)
    built = force or did not in local
    if built:
      ds = _record(family, kind, did, env_id, profile, seed, refs)
    else:
      ds = minari.load_dataset(did)
    returns = np.array([e.rewards.sum() for e in ds.iterate_episodes()])
    if kind in ("random", "expert"):
      refs[kind] = float(returns.mean())
    if kind == "random":
      family.random_return = refs["random"]
    if kind in kinds:
      rows.append(_summary(ds, did, returns, built))
  # random and expert were written before their own reference scores existed: add them now.
  for kind in ("random", "expert"):
    storage = minari.load_dataset(dataset_id(env, profile, kind)).storage
    if storage.metadata.get("ref_min_score") is None:
      storage.update_metadata({"ref_min_score": refs["random"], "ref_max_score": refs["expert"]})
  return rows


def _record(family, kind: str, did: str, env_id: str, profile: str, seed: int, refs: dict):
  """Records one dataset of a family (its behaviour policies trained or read back first)."""
  family.prepare(kind)  # trains the behaviour policies (or reads them back) outside the timing
  t0 = time.time()
  meta = dict(
    ref_min_score=refs.get("random"),
    ref_max_score=refs.get("expert"),
    description=f"{kind} data of {env_id} by a {family.algorithm} behaviour policy "
    f"({profile} profile, seed {seed}); made by iwsft.control.datasets",
    algorithm_name=f"iwsft-{family.algorithm.replace(' ', '-')}-{kind}",
  )
  recorded = family.recorded(kind)
  if recorded is not None:
    ds = collect.write_episodes(did, env_id, recorded, **meta)
  else:
    parts = family.parts(kind)
    with tqdm(total=sum(n for _, n in parts), desc=did, unit="ep", leave=False) as bar:
      ds = collect.collect_dataset(
        did, env_id, parts, seed=seed + 100_000 * KINDS.index(kind), progress=bar.update, **meta
      )
  ds.storage.update_metadata(
    {"iwsft_seconds": round(time.time() - t0, 1), "iwsft_behaviour_seconds": family.train_seconds}
  )
  return ds


def _summary(ds, did: str, returns: np.ndarray, built: bool) -> dict:
  return {
    "dataset": did,
    "episodes": ds.total_episodes,
    "steps": ds.total_steps,
    "return_mean": float(returns.mean()),
    "return_std": float(returns.std()),
    "seconds": ds.storage.metadata.get("iwsft_seconds"),
    "behaviour_seconds": ds.storage.metadata.get("iwsft_behaviour_seconds"),
    "built": built,
  }


def table(rows) -> str:
  """Markdown: one row per dataset. `seconds` is the time its recording took when it was built
  (stored in its metadata, so reused datasets show it too); the SAC behaviour training, shared by an
  environment's kinds, is one line below the table."""
  fmt = lambda x: "n/a" if x is None else f"{x:.1f}"
  body = [
    [
      r["dataset"],
      f"{r['episodes']:,}",
      f"{r['steps']:,}",
      f"{r['return_mean']:.1f}",
      f"{r['return_std']:.1f}",
      f"{fmt(r['seconds'])}{'' if r['built'] else ' (reused)'}",
    ]
    for r in rows
  ]
  trained = {}
  for r in rows:
    if r.get("behaviour_seconds") is not None:
      trained.setdefault(r["dataset"].rsplit("/", 1)[0], r["behaviour_seconds"])
  notes = [f"SAC behaviour training for {k}: {v:.1f} seconds" for k, v in trained.items()]
  head = ["dataset", "episodes", "steps", "return mean", "return std", "seconds"]
  return "\n".join([format_table(head, body), *([""] + notes if notes else [])])
