"""Datasets that ship with the project: the small Hopper family, so that the main job (and the
default sweep) trains on the same episodes on every machine.

SAC training follows each CPU's own float path: rebuilt elsewhere, the family differs (on one
AMD machine, 112 medium-replay episodes instead of 254). These copies are the ones
`experiments/make_datasets.py --env=hopper --profile=small --seed=0` recorded on the development
machine (Intel Xeon, x86_64); `build()` installs them into $MINARI_DATASETS_PATH where a dataset is
missing, and `--force` records the family anew on the machine at hand.

Layout: shipped/<dataset id>/data/{main_data.hdf5, metadata.json}, as Minari stores datasets.
"""

from __future__ import annotations

import os
import shutil

ROOT = os.path.join(os.path.dirname(__file__), "shipped")


def shipped_ids() -> list[str]:
  """The ids of the shipped datasets."""
  ids = []
  for parent, _, files in os.walk(ROOT):
    if "metadata.json" in files and os.path.basename(parent) == "data":
      ids.append(os.path.relpath(os.path.dirname(parent), ROOT).replace(os.sep, "/"))
  return sorted(ids)


def install(dataset_id: str, datasets_path: str) -> bool:
  """Copies a shipped dataset into datasets_path (Minari's root); False if none is shipped."""
  src = os.path.join(ROOT, dataset_id)
  if not os.path.isdir(os.path.join(src, "data")):
    return False
  dst = os.path.join(datasets_path, dataset_id)
  tmp = os.path.join(os.path.dirname(dst), "." + os.path.basename(dst) + ".installing")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.replace(tmp, dst)
  return True
