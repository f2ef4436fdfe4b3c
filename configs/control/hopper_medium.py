"""iwsft/hopper/medium-v1 (Hopper, full profile): the authors' recipe.

experiments/control.py --config=configs/control/hopper_medium.py[:cpu]
"""

from iwsft.control.config import dataset_recipe


def get_config(preset: str = "paper"):
  return dataset_recipe("iwsft/hopper/medium-v1", preset)
