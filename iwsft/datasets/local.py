"""Where local Minari datasets live: $MINARI_DATASETS_PATH, else Minari's default."""

from __future__ import annotations

import os


def datasets_path() -> str:
  return os.environ.get(
    "MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets")
  )
