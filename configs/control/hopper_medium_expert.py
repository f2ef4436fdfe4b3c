"""iwsft/hopper/medium-expert-v1 (Hopper, full profile): the authors' recipe.

experiments/control.py --config=configs/control/hopper_medium_expert.py[:cpu]
"""

from iwsft.control.config import dataset_recipe


def get_config(preset: str = "paper"):
  return dataset_recipe("iwsft/hopper/medium-expert-v1", preset)
