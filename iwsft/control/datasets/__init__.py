"""The project's own D4RL-style Minari datasets: families (build, check, tables), collect (scripted
behaviour and recording), sac (the SAC learner whose snapshots are the locomotion behaviours)."""

from iwsft.control.datasets.families import (
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
