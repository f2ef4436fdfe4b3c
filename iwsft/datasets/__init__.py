"""The project's own D4RL-style Minari datasets: families (build, check, tables), collect (scripted
behaviour and recording), sac (the SAC learner whose snapshots are the locomotion behaviours),
shipped (the small Hopper family that ships with the package). Extra: control."""

import os

from iwsft.errors import require_extra

require_extra("control", "gymnasium", "mujoco", "minari", "threadpoolctl")
os.environ.setdefault("MUJOCO_GL", "egl")  # as iwsft.control: headless rendering

from iwsft.datasets.families import (  # noqa: E402
  ENVS,
  KINDS,
  SAC_PROFILES,
  VERSION,
  build,
  check_family,
  dataset_id,
  replay_episodes,
  table,
)

__all__ = [
  "ENVS",
  "KINDS",
  "SAC_PROFILES",
  "VERSION",
  "build",
  "check_family",
  "dataset_id",
  "replay_episodes",
  "table",
]
