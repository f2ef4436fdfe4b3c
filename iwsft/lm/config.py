"""Default configuration of the language pipeline (sized for a 2-core CPU).

The iw-SFT settings follow the authors' LM recipe (shared/paper.md): temperature 1, sequence
weights clipped to [0, 16] without batch normalisation, per-token variant clipped to [0.2, 1.8],
token-mean loss, Adam betas (0.9, 0.95), weight decay 1e-4, cosine schedule with 5% warm-up.
Their q is the detached current model (q_decay 0); ours defaults to a lagged copy (0.9), as the
bound asks for a q close to but not equal to the trained policy; set --q_decay=0 for theirs.
"""

from __future__ import annotations

import ml_collections

LM_METHODS = ("sft", "iw_sft", "sft_q")
STAGES = ("base", "sample", "curate", "finetune", "evaluate")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ",".join(STAGES)
  c.methods = ",".join(LM_METHODS)
  c.data = ""  # a JSON-lines file of curated records to fine-tune on instead of stages 2-3
  c.num_devices = 0
  c.fsdp = 1  # devices each large parameter (and its optimiser state) is split over

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 64
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.d_ff = 256
  c.model.max_len = 64

  c.task = ml_collections.ConfigDict()
  c.task.digits = 3
  c.task.demos = 20_000  # noisy demonstrations the base model π_ref is trained on
  c.task.error_rate = 0.05  # random column mistakes
  c.task.carry_error_rate = 0.6  # systematic "forgets the carry" mistakes
  c.task.sample_prompts = 1_000
  c.task.samples_per_prompt = 4
  c.task.sample_temperature = 1.0
  c.task.eval_problems = 500

  c.base = ml_collections.ConfigDict()
  c.base.steps = 2_000
  c.base.batch_size = 64
  c.base.learning_rate = 3e-3
  c.base.warmup_steps = 100

  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 400
  c.finetune.batch_size = 64
  c.finetune.learning_rate = 3e-4
  c.finetune.warmup_steps = 20

  c.weight_decay = 1e-4
  c.adam_b2 = 0.95

  c.weighting = "sequence"
  c.temperature = 1.0
  c.w_min = 0.0
  c.w_max = 16.0
  c.self_normalise = False
  c.length_normalise = True  # log-ratio averaged over completion tokens (False: summed)
  c.step_w_min = 0.2
  c.step_w_max = 1.8
  c.q_decay = 0.9
  c.quality_beta = 0.1

  c.eval_temperature = 1.0
  c.top_k = 0  # sampling (stage 2 and sampled evaluation) from the k most likely tokens; 0: all
  c.steps_per_dispatch = 100

  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.skip_nonfinite = False
  return c
