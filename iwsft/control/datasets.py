"""Building the project's own D4RL-style Minari datasets (random, medium, medium-replay, expert,
medium-expert) with reference scores, for experiments/make_datasets.py and the demo.

Ids: iwsft/<env>-small/<kind>-v0 for the small profile, iwsft/<env>/<kind>-v0 for full.
"""

import time

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from iwsft.control import collect
from iwsft.errors import UserError

ENVS = {"pendulum": "InvertedPendulum-v5", "hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5",
        "walker2d": "Walker2d-v5"}
KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert")

# Behaviour-policy training and episodes per kind for the SAC-made locomotion families.
# small: about 2.5 minutes on 2 cores for Hopper (measured); full: not yet measured.
SAC_PROFILES = {
    "small": {"sac": {"total_steps": 30_000, "start_steps": 5_000, "snapshot_every": 2_500, "hidden": (256, 256)},
              "episodes": {"random": 20, "medium": 20, "expert": 10}},
    "full": {"sac": {"total_steps": 300_000, "start_steps": 10_000, "snapshot_every": 10_000, "hidden": (256, 256)},
             "episodes": {"random": 1000, "medium": 1000, "expert": 1000}},
}


def dataset_id(env: str, profile: str, kind: str) -> str:
  return f"iwsft/{env}{'-small' if profile == 'small' else ''}/{kind}-v0"


class _Pendulum:
  """The scripted pendulum family: behaviours from iwsft.control.collect."""

  algorithm = "scripted controller"

  def __init__(self, env_id, profile, seed):
    self.space = gym.make(env_id).action_space
    self.profile = profile

  def parts(self, kind):
    return collect.pendulum_parts(kind, self.profile, self.space)

  def recorded(self, kind):
    return None


class _SACFamily:
  """Locomotion: SAC is trained once (lazily); expert is the best snapshot, medium the snapshot whose
  evaluation return is closest to a third of the way from the random data's return to the expert's
  (D4RL's "a third of the expert", made meaningful for environments with negative returns), and
  medium-replay every training episode up to the medium snapshot."""

  algorithm = "SAC"

  def __init__(self, env_id, profile, seed):
    self.env_id, self.profile, self.seed = env_id, profile, seed
    self.space = gym.make(env_id).action_space
    self._trained = None
    self.random_return = None  # set by build() once the random data exists

  def _train(self):
    if self._trained is None:
      from iwsft.control import sac

      p = SAC_PROFILES[self.profile]
      snaps, episodes, act = sac.train_sac(self.env_id, sac.SACConfig(seed=self.seed, **p["sac"]))
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


def build(env: str, profile: str, kinds, seed: int, force: bool) -> list[dict]:
  """Builds (or reuses) the datasets; returns one summary row per dataset."""
  import minari

  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise UserError(f"unknown dataset kinds: {', '.join(sorted(unknown))}")
  if env not in ENVS:
    raise UserError(f"unknown environment {env!r}; choose from {', '.join(ENVS)}")
  env_id = ENVS[env]
  family = (_Pendulum if env == "pendulum" else _SACFamily)(env_id, profile, seed)
  # Reference scores need the random and expert data, so they are built first.
  order = ["random", "expert"] + [k for k in KINDS if k not in ("random", "expert")]
  needed = [k for k in order if k in kinds or k in ("random", "expert")]
  local = minari.list_local_datasets()
  rows, refs = [], {}
  for kind in needed:
    did = dataset_id(env, profile, kind)
    t0 = time.time()
    if did in local and force:
      minari.delete_dataset(did)
    if did in local and not force:
      ds, built = minari.load_dataset(did), False
    else:
      meta = dict(ref_min_score=refs.get("random"), ref_max_score=refs.get("expert"),
                  description=f"{kind} data of {env_id} by a {family.algorithm} behaviour policy "
                              f"({profile} profile, seed {seed}); made by iwsft.control.datasets",
                  algorithm_name=f"iwsft-{family.algorithm.replace(' ', '-')}-{kind}")
      recorded = family.recorded(kind)
      if recorded is not None:
        ds = collect.write_episodes(did, env_id, recorded, **meta)
      else:
        parts = family.parts(kind)
        with tqdm(total=sum(n for _, n in parts), desc=did, unit="ep", leave=False) as bar:
          ds = collect.collect_dataset(did, env_id, parts, seed=seed + 100_000 * KINDS.index(kind),
                                       progress=bar.update, **meta)
      built = True
    returns = np.array([e.rewards.sum() for e in ds.iterate_episodes()])
    if kind in ("random", "expert"):
      refs[kind] = float(returns.mean())
    if kind == "random":
      family.random_return = refs["random"]
    if kind in kinds:
      rows.append({"dataset": did, "episodes": ds.total_episodes, "steps": ds.total_steps,
                   "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                   "seconds": round(time.time() - t0, 1), "built": built})
  # random and expert were written before their own reference scores existed: add them now.
  for kind in ("random", "expert"):
    storage = minari.load_dataset(dataset_id(env, profile, kind)).storage
    if storage.metadata.get("ref_min_score") is None:
      storage.update_metadata({"ref_min_score": refs["random"], "ref_max_score": refs["expert"]})
  return rows


def table(rows) -> str:
  head = "| dataset | episodes | steps | return mean | return std | seconds |\n|---|---|---|---|---|---|"
  body = [f"| {r['dataset']} | {r['episodes']} | {r['steps']} | {r['return_mean']:.1f} | "
          f"{r['return_std']:.1f} | {r['seconds']:.1f}{'' if r['built'] else ' (reused)'} |" for r in rows]
  return "\n".join([head, *body])
