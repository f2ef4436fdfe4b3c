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

ENVS = {"pendulum": "InvertedPendulum-v5"}


def dataset_id(env: str, profile: str, kind: str) -> str:
  return f"iwsft/{env}{'-small' if profile == 'small' else ''}/{kind}-v0"


def build(env: str, profile: str, kinds, seed: int, force: bool) -> list[dict]:
  """Builds (or reuses) the datasets; returns one summary row per dataset."""
  import minari

  unknown = set(kinds) - set(collect.PENDULUM_KINDS)
  if unknown:
    raise UserError(f"unknown dataset kinds: {', '.join(sorted(unknown))}")
  env_id = ENVS[env]
  action_space = gym.make(env_id).action_space
  # Reference scores need the random and expert data, so they are built first.
  order = ["random", "expert"] + [k for k in collect.PENDULUM_KINDS if k not in ("random", "expert")]
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
      parts = collect.pendulum_parts(kind, profile, action_space)
      total = sum(n for _, n in parts)
      with tqdm(total=total, desc=did, unit="ep", leave=False) as bar:
        ds = collect.collect_dataset(did, env_id, parts, seed=seed + 100_000 * collect.PENDULUM_KINDS.index(kind),
                                     ref_min_score=refs.get("random"), ref_max_score=refs.get("expert"),
                                     description=f"{kind} data of the scripted {env} family "
                                                 f"({profile} profile, seed {seed}); see iwsft.control.collect",
                                     algorithm_name=f"scripted-{env}-{kind}", progress=bar.update)
      built = True
    returns = np.array([e.rewards.sum() for e in ds.iterate_episodes()])
    if kind in ("random", "expert"):
      refs[kind] = float(returns.mean())
    if kind in kinds:
      rows.append({"dataset": did, "episodes": ds.total_episodes, "steps": ds.total_steps,
                   "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                   "seconds": round(time.time() - t0, 1), "built": built})
  # random and expert were written before their own reference scores existed: add them now.
  for kind in ("random", "expert"):
    did = dataset_id(env, profile, kind)
    meta = minari.load_dataset(did).storage.metadata
    if meta.get("ref_min_score") is None:
      minari.load_dataset(did).storage.update_metadata(
          {"ref_min_score": refs["random"], "ref_max_score": refs["expert"]})
  return rows


def table(rows) -> str:
  head = "| dataset | episodes | steps | return mean | return std | seconds |\n|---|---|---|---|---|---|"
  body = [f"| {r['dataset']} | {r['episodes']} | {r['steps']} | {r['return_mean']:.1f} | "
          f"{r['return_std']:.1f} | {r['seconds']:.1f}{'' if r['built'] else ' (reused)'} |" for r in rows]
  return "\n".join([head, *body])
