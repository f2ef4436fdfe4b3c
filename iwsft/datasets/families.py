"""Building the project's own D4RL-style Minari datasets (random, medium, medium-replay, expert,
medium-expert) with reference scores, for experiments/make_datasets.py and the demo.

Ids: iwsft/<env>-small/<kind>-v1 for the small profile, iwsft/<env>/<kind>-v1 for full. Before
anything is kept, the family's data is checked for a spread of quality (check_family); a family
that fails is deleted and the build ends with the reasons.
"""

import os
import shutil
import sys
import time

import numpy as np

from iwsft import envs as envs_lib
from iwsft.datasets import collect, shipped
from iwsft.datasets.local import datasets_path
from iwsft.errors import UserError
from iwsft.io import progress
from iwsft.io.report import format_table

ENVS = {
  "pendulum": "InvertedPendulum-v5",
  "hopper": "Hopper-v5",
  "halfcheetah": "HalfCheetah-v5",
  "walker2d": "Walker2d-v5",
}
KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert")

# D4RL's expert reference returns (REF_MAX_SCORE) of the v2 locomotion datasets.
D4RL_EXPERT = {"hopper": 3234.3, "halfcheetah": 12135.0, "walker2d": 4592.3}

# Behaviour-policy training, episodes per kind and the family's quality checks, per profile. SAC
# trains total_steps, then on until a snapshot's evaluation return reaches the environment's target
# (an error at max_steps). Small: minutes on 2 cores; full: experts at 80% of D4RL's.
SAC_PROFILES = {
  "small": {
    "sac": {
      "total_steps": 30_000,
      "max_steps": 100_000,
      "start_steps": 5_000,
      "snapshot_every": 2_500,
      "hidden": (256, 256),
    },
    "targets": {"hopper": 600.0, "halfcheetah": 1500.0, "walker2d": 600.0},
    "episodes": {"random": 20, "medium": 20, "expert": 10},
    "checks": {"min_replay_episodes": 30},
  },
  "full": {
    "sac": {
      "total_steps": 300_000,
      "max_steps": 1_500_000,  # HalfCheetah stopped at 870,000 and 1,070,000 on two CPUs
      "start_steps": 10_000,
      "snapshot_every": 10_000,
      "hidden": (256, 256),
      "eval_episodes": 10,
    },
    "targets": {env: 0.8 * ret for env, ret in D4RL_EXPERT.items()},
    "episodes": {"random": 1000, "medium": 1000, "expert": 1000},
    "checks": {"min_replay_episodes": 100},
  },
}
# The scripted pendulum family is checked alike (its episode counts: collect.PENDULUM_PROFILES).
PENDULUM_CHECKS = {"small": {"min_replay_episodes": 50}, "full": {"min_replay_episodes": 100}}
VERSION = 1  # of every family's ids; v0 was recorded by SAC runs of a fixed length, unchecked


def check_family(returns: dict, min_expert: float | None, min_replay_episodes: int) -> list[str]:
  """The spread of quality a D4RL-style family must have, checked on its data.

  returns: {kind: episode returns [N]} with random, medium and expert (and medium-replay if built).
  With gap = expert − random (mean returns): medium at least 15% of the gap above random and 30%
  below expert; the expert at least min_expert; medium-replay (a learner's episodes up to medium)
  at least min_replay_episodes episodes whose 10th and 90th return percentiles lie a quarter of
  medium − random apart. -> the failed checks (none: passed).
  """
  r, m, e = (float(np.mean(returns[k])) for k in ("random", "medium", "expert"))
  gap, fails = e - r, []
  if gap <= 0:
    fails.append(f"the expert data's return ({e:.1f}) is not above the random data's ({r:.1f})")
  elif m - r < 0.15 * gap or e - m < 0.3 * gap:
    fails.append(
      f"medium's return ({m:.1f}) is not clearly between random's ({r:.1f}) and expert's ({e:.1f})"
    )
  if min_expert is not None and e < min_expert:
    fails.append(f"the expert data's return ({e:.1f}) is below the target {min_expert:.1f}")
  replay = returns.get("medium-replay")
  if replay is not None:
    if len(replay) < min_replay_episodes:
      fails.append(f"medium-replay has {len(replay)} episodes, fewer than {min_replay_episodes}")
    spread = float(np.percentile(replay, 90) - np.percentile(replay, 10))
    if spread < 0.25 * (m - r):
      fails.append(
        f"medium-replay's returns spread over {spread:.1f}, less than a quarter of medium − random"
        f" ({m - r:.1f})"
      )
  return fails


def replay_episodes(episodes: list, medium_step: int, at_least: int) -> list:
  """medium-replay: the learner's training episodes (in the order they ended) up to the medium
  snapshot's step, and the ones after it too while fewer than `at_least` (a learner that passes
  medium within a few long episodes, like SAC on HalfCheetah, still gives enough episodes)."""
  upto = sum(e.end_step <= medium_step for e in episodes)
  return episodes[: max(upto, at_least)]


def dataset_id(env: str, profile: str, kind: str) -> str:
  return f"iwsft/{env}{'-small' if profile == 'small' else ''}/{kind}-v{VERSION}"


class _Pendulum:
  """The scripted pendulum family: behaviours from iwsft.datasets.collect."""

  algorithm = "scripted controller"
  train_seconds = None

  target = None

  def __init__(self, env_id, profile, seed):
    self.space = envs_lib.make(env_id).action_space
    self.profile = profile
    self.checks = PENDULUM_CHECKS.get(profile)

  def prepare(self, kind):
    pass

  def parts(self, kind):
    return collect.pendulum_parts(kind, self.profile, self.space)

  def recorded(self, kind):
    return None


class _SACFamily:
  """Locomotion: SAC is trained once (lazily); expert is the snapshot it stopped on (with a
  target; else the best), medium the snapshot before it whose evaluation return is closest to a
  third of the way from the random data's return to the expert's (D4RL's "a third of the expert",
  made meaningful for environments with negative returns), and medium-replay every training
  episode up to the medium snapshot."""

  algorithm = "SAC"

  def __init__(self, env, env_id, profile, seed, cache_path=None, max_steps=None):
    self.env, self.env_id, self.profile, self.seed = env, env_id, profile, seed
    self.max_steps = max_steps  # overrides the profile's SAC step cap
    p = SAC_PROFILES[profile]
    self.target = p.get("targets", {}).get(env)
    self.checks = p.get("checks")
    env = envs_lib.make(env_id)
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
      from iwsft.datasets import sac

      p = SAC_PROFILES[self.profile]
      cap = {} if self.max_steps is None else {"max_steps": self.max_steps}
      cfg = sac.SACConfig(seed=self.seed, target_return=self.target, **{**p["sac"], **cap})
      cached = _read_cache(self.cache_path, cfg, self.obs_dim, self.space.shape[0])
      if cached is None:
        partial = None if self.cache_path is None else self.cache_path + ".partial"
        snaps, episodes, _ = sac.train_sac(self.env_id, cfg, checkpoint=partial)
        self.train_seconds = snaps[-1].seconds  # over every resumed part of the training
        if self.cache_path is not None:
          sac.write_behaviour(self.cache_path, cfg, snaps, episodes, self.train_seconds)
          shutil.rmtree(partial, ignore_errors=True)
      else:
        snaps, episodes, self.train_seconds = cached
      # with a target, training stopped on the snapshot that reached it the second time in a row;
      # the best of many noisy evaluations would overstate its data's return
      expert = snaps[-1] if self.target is not None else max(snaps, key=lambda s: s.eval_return)
      before = [s for s in snaps if s.step <= expert.step]
      lo = self.random_return if self.random_return is not None else 0.0
      target = lo + (expert.eval_return - lo) / 3
      medium = min(before, key=lambda s: abs(s.eval_return - target))
      self._trained = {"expert": expert, "medium": medium, "episodes": episodes}
      self._plot(snaps)
    return self._trained

  def _plot(self, snaps) -> None:
    """SAC's learning curve with the medium and expert snapshots, beside the cached policies."""
    from iwsft.io import plots

    if self.cache_path is None:
      return
    path = self.cache_path + ".png"
    marks = {k: (self._trained[k].step, self._trained[k].eval_return) for k in ("medium", "expert")}
    steps, returns = [s.step for s in snaps], [s.eval_return for s in snaps]
    title = f"SAC on {self.env_id} ({self.profile} profile, seed {self.seed})"
    plots.behaviour_training(steps, returns, marks, path, title, self.target)
    print(f"SAC's learning curve: {path}", file=sys.stderr)

  def _actor(self, snap):
    from iwsft.datasets import sac

    return sac.numpy_behaviour(snap.actor, self.space)

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
    at_least = (self.checks or {}).get("min_replay_episodes", 0)
    return replay_episodes(t["episodes"], t["medium"].step, at_least)


def _behaviour_cache(env: str, profile: str, seed: int) -> str:
  """Where a family's trained SAC (snapshots and training episodes) is kept, so that building a
  missing kind later, or after an interruption, does not train again. A hidden directory, which
  Minari does not list as a dataset."""
  import minari.storage.datasets_root_dir as root

  return os.path.join(root.get_dataset_path(), ".iwsft-behaviour", f"{env}-{profile}-seed{seed}")


def _read_cache(path, cfg, obs_dim: int, act_dim: int):
  """(snapshots, episodes, seconds) of the cached SAC run of cfg's recipe (sac._continues); None
  if there is none."""
  from iwsft.datasets import sac

  saved = None if path is None else sac.read_behaviour(path, obs_dim, act_dim)
  if saved is None or not sac._continues(saved[0], cfg, saved[1][-1].step):  # another recipe
    return None
  return saved[1:]


def build(
  env: str, profile: str, kinds, seed: int, force: bool, max_steps: int | None = None
) -> list[dict]:
  """Builds (or reuses) the datasets; returns one summary row per dataset. A missing dataset that
  ships with the project (shipped.py; seed 0 only) is installed from its copy unless `force`.
  max_steps: SAC's step cap instead of the profile's (raised after a TargetNotReached, training
  resumes from its checkpoint)."""
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
    cache = _behaviour_cache(env, profile, seed)
    family = _SACFamily(env, env_id, profile, seed, cache, max_steps)
  # Reference scores need the random and expert data, so they are built first; the family checks
  # need medium too.
  order = ["random", "expert"] + [k for k in KINDS if k not in ("random", "expert")]
  needed = [k for k in order if k in kinds or k in ("random", "expert", "medium")]
  local = minari.list_local_datasets()
  rows, refs, family_returns, origins = [], {}, {}, {}
  for kind in needed:
    did = dataset_id(env, profile, kind)
    if did in local and force:
      minari.delete_dataset(did)
    origin = _origin(did, did in local and not force, force, seed)
    if origin == "built":
      ds = _record(family, kind, did, env_id, profile, seed, refs)
    else:
      ds = minari.load_dataset(did)
    returns = np.array([e.rewards.sum() for e in ds.iterate_episodes()])
    family_returns[kind], origins[did] = returns, origin
    if kind in ("random", "expert"):
      refs[kind] = float(returns.mean())
    if kind == "random":
      family.random_return = refs["random"]
    if kind in kinds:
      rows.append(_summary(ds, did, returns, origin))
  _check_built(family, family_returns, origins)
  # random and expert were written before their own reference scores existed: add them now.
  for kind in ("random", "expert"):
    storage = minari.load_dataset(dataset_id(env, profile, kind)).storage
    if storage.metadata.get("ref_min_score") is None:
      storage.update_metadata({"ref_min_score": refs["random"], "ref_max_score": refs["expert"]})
  return rows


def _origin(did: str, local: bool, force: bool, seed: int) -> str:
  """Where a dataset comes from: "reused" (local), "shipped" (installed now from the project's
  copy: seed 0, not forced) or "built" (to be recorded)."""
  if local:
    return "reused"
  if not force and seed == 0 and shipped.install(did, datasets_path()):
    return "shipped"
  return "built"


def _check_built(family, returns: dict, origins: dict) -> None:
  """Runs check_family when this call recorded data; on failure deletes what it recorded."""
  import minari

  if family.checks is None or "built" not in origins.values():
    return
  fails = check_family(returns, family.target, **family.checks)
  if fails:
    built = [did for did, origin in origins.items() if origin == "built"]
    for did in built:
      minari.delete_dataset(did)
    raise UserError(
      f"the family failed its quality checks ({'; '.join(fails)}); deleted {', '.join(built)}"
    )


def _record(family, kind: str, did: str, env_id: str, profile: str, seed: int, refs: dict):
  """Records one dataset of a family (its behaviour policies trained or read back first)."""
  family.prepare(kind)  # trains the behaviour policies (or reads them back) outside the timing
  t0 = time.time()
  meta = dict(
    ref_min_score=refs.get("random"),
    ref_max_score=refs.get("expert"),
    description=f"{kind} data of {env_id} by a {family.algorithm} behaviour policy "
    f"({profile} profile, seed {seed}); made by iwsft.datasets",
    algorithm_name=f"iwsft-{family.algorithm.replace(' ', '-')}-{kind}",
  )
  recorded = family.recorded(kind)
  if recorded is not None:
    ds = collect.write_episodes(did, env_id, recorded, **meta)
  else:
    parts = family.parts(kind)
    with progress.bar(sum(n for _, n in parts), did, unit="ep") as bar:
      ds = collect.collect_dataset(
        did, env_id, parts, seed=seed + 100_000 * KINDS.index(kind), progress=bar.update, **meta
      )
  ds.storage.update_metadata(
    {"iwsft_seconds": round(time.time() - t0, 1), "iwsft_behaviour_seconds": family.train_seconds}
  )
  return ds


def _summary(ds, did: str, returns: np.ndarray, origin: str) -> dict:
  return {
    "dataset": did,
    "episodes": ds.total_episodes,
    "steps": ds.total_steps,
    "return_mean": float(returns.mean()),
    "return_std": float(returns.std()),
    "seconds": ds.storage.metadata.get("iwsft_seconds"),
    "behaviour_seconds": ds.storage.metadata.get("iwsft_behaviour_seconds"),
    "origin": origin,  # "built" here, "reused" (found locally) or "shipped" (installed copy)
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
      f"{fmt(r['seconds'])}{'' if r['origin'] == 'built' else ' (' + r['origin'] + ')'}",
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
