"""Every language preset is a valid configuration, checked by the one validation the CLI runs."""

import pytest

from iwsft.lm.config import PRESETS, get_config
from iwsft.lm.settings import check_settings


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_the_settings_check(preset):
  cfg = get_config(preset)
  if preset == "s1k":  # the user gives the pretrained checkpoint
    cfg.model.path = "smollm2"
  s = check_settings(cfg)
  assert s.finetune.steps % cfg.steps_per_dispatch == 0


def test_the_5_epoch_preset_is_smollm2_trained_further():
  base, long = get_config("smollm2"), get_config("smollm2-5epochs")
  assert long.model == base.model and long.objective == base.objective
  assert long.finetune.steps >= 5 * long.task.sample_prompts * 4 * 0.2 / long.finetune.batch_size
  assert long.task.eval_problems >= 500 and tuple(long.methods) == ("sft", "iw_sft")
