"""iwsft/hopper-small/medium-replay-v1 (shipped): the default sweep's recipe, preset "cpu-sweep"
(`:cpu` is the main job's).

  experiments/sweep.py --dataset_configs=configs/control/hopper_small_medium_replay.py
"""

from iwsft.control.config import dataset_recipe


def get_config(preset: str = "cpu-sweep"):
  return dataset_recipe("iwsft/hopper-small/medium-replay-v1", preset)
