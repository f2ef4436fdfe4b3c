"""iwsft/walker2d/medium-v1 (Walker2d, full profile): the authors' recipe.

experiments/control.py --config=configs/control/walker2d_medium.py[:cpu]
"""

from iwsft.control.config import dataset_recipe


def get_config(preset: str = "paper"):
  return dataset_recipe("iwsft/walker2d/medium-v1", preset)
