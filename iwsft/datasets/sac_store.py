"""SAC's on-disk forms, written with orbax: a run in progress (to resume it exactly) and a finished
run's behaviour cache (its snapshots and training episodes).

Each is an orbax directory of two items: `arrays`, a flat {name: array} (pytrees such as the SAC
state are stored as their leaves and rebuilt on a template's structure), and `meta`, JSON (the
recipe, scalars, the numpy generator's state, every array's shape and dtype). Nothing depends on
Python class names. A directory is replaced only once its successor is complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from iwsft.datasets.collect import Episode
from iwsft.datasets.sac_agent import SACConfig

FORMAT = 1


def write(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """Writes {name: array} and JSON meta to directory `path`, replacing it only once the new one
  is complete (a crash leaves the old one or the new one, never neither)."""
  path = os.path.abspath(path)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  shapes = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}
  meta = {**meta, "format": FORMAT, "shapes": shapes}
  new = path + ".new"
  shutil.rmtree(new, ignore_errors=True)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  stored = {k: v for k, v in arrays.items() if v.size}  # orbax refuses empty arrays: meta has them
  args = ocp.args.Composite(arrays=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta))
  ckptr.save(new, args)
  shutil.rmtree(path, ignore_errors=True)
  os.rename(new, path)


def read(path: str) -> tuple[dict[str, np.ndarray], dict] | None:
  """({name: array}, meta) from directory `path` (or from a complete `path`.new that a crash left
  behind); None when there is neither, or it is of another format."""
  path = os.path.abspath(path)
  if not os.path.isdir(path) and os.path.isdir(path + ".new"):
    os.rename(path + ".new", path)
  if not os.path.isdir(path):
    return None
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("format") != FORMAT:
    return None
  shapes = {k: (tuple(s), np.dtype(d)) for k, (s, d) in meta["shapes"].items()}
  abstract = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items() if np.prod(s)}
  arrays = {k: np.zeros(s, d) for k, (s, d) in shapes.items() if not np.prod(s)}
  if abstract:
    got = ckptr.restore(path, ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
    arrays.update({k: np.asarray(v) for k, v in got["arrays"].items()})
  return arrays, meta


def config_json(cfg: SACConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from(d: dict) -> SACConfig:
  return SACConfig(**{**d, "hidden": tuple(d["hidden"])})


def tree_arrays(prefix: str, tree) -> dict[str, np.ndarray]:
  """A pytree's leaves as {prefix.i: array}."""
  return {f"{prefix}.{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def tree_from(prefix: str, arrays: dict[str, np.ndarray], template):
  """The pytree of `template`'s structure whose leaves are arrays[prefix.i]."""
  leaves, treedef = jax.tree.flatten(template)
  if any(f"{prefix}.{i}" not in arrays for i in range(len(leaves))):
    raise ValueError(f"the saved {prefix} does not have the template's {len(leaves)} leaves")
  return jax.tree.unflatten(treedef, [arrays[f"{prefix}.{i}"] for i in range(len(leaves))])


def episodes_arrays(prefix: str, episodes: list[Episode], extra: tuple[str, ...] = ()) -> dict:
  """Episodes as concatenated arrays: observations [sum(T+1), O], actions [sum T, A], rewards
  [sum T], and per episode lengths T, terminated, truncated, seed and the `extra` int fields."""
  out = {
    "lengths": np.array([len(e.rewards) for e in episodes], np.int64),
    "terminated": np.array([e.terminated for e in episodes], bool),
    "truncated": np.array([e.truncated for e in episodes], bool),
    "seed": np.array([e.seed for e in episodes], np.int64),
    **{f: np.array([getattr(e, f) for e in episodes], np.int64) for f in extra},
  }
  if episodes:
    for f in ("observations", "actions", "rewards"):
      out[f] = np.concatenate([getattr(e, f) for e in episodes])
  return {f"{prefix}.{k}": v for k, v in out.items()}


def episodes_from(prefix: str, arrays: dict, cls=Episode, extra: tuple[str, ...] = ()) -> list:
  """The episodes (of class `cls`) that episodes_arrays stored under prefix."""
  a = {k.removeprefix(prefix + "."): v for k, v in arrays.items() if k.startswith(prefix + ".")}
  ends = np.cumsum(a["lengths"])
  out = []
  for i, (end, n) in enumerate(zip(ends, a["lengths"])):
    start = end - n
    out.append(
      cls(
        a["observations"][start + i : end + i + 1],
        a["actions"][start:end],
        a["rewards"][start:end],
        bool(a["terminated"][i]),
        bool(a["truncated"][i]),
        int(a["seed"][i]),
        **{f: int(a[f][i]) for f in extra},
      )
    )
  return out
