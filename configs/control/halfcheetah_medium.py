"""iwsft/halfcheetah/medium-v1 (HalfCheetah, full profile): the authors' recipe.

experiments/control.py --config=configs/control/halfcheetah_medium.py[:cpu]
"""

from iwsft.control.config import dataset_recipe


def get_config(preset: str = "paper"):
  return dataset_recipe("iwsft/halfcheetah/medium-v1", preset)
