"""Default configuration of the control pipeline: the authors' recipe (shared/paper.md).

Two stages, as the authors run them:
  reference: BC on all episodes; this is π_ref, and the result of method "bc".
  finetune:  filtered BC / iw-SFT / SFT(Q) / iw-SFT(Q), starting from π_ref's weights.
The authors' settings assume a GPU (batches of 128-256 whole 1000-step episodes); the README's CPU
commands override batch sizes and steps explicitly.
"""

from __future__ import annotations

import ml_collections

METHODS = ("bc", "filtered_bc", "iw_sft", "sft_q", "iw_sft_q")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "iwsft/hopper-small/medium-replay-v0"
  c.method = "iw_sft"
  c.seed = 0
  c.download = False
  c.num_devices = 0  # 0: all devices
  c.val_fraction = 0.0

  # Stage 1: π_ref = BC on all data.
  c.reference = ml_collections.ConfigDict()
  c.reference.steps = 10_000
  c.reference.batch_size = 128
  c.reference.batch_level = "episode"  # "episode" (whole padded episodes) or "step"
  c.reference.learning_rate = 1e-3
  c.reference.warmup_steps = 0
  c.reference.schedule = "constant"  # "constant" or "cosine"

  # Stage 2: the method, fine-tuned from π_ref.
  c.steps = 2_000
  c.batch_size = 256
  c.batch_level = "episode"
  c.learning_rate = 4e-5
  c.warmup_steps = 300
  c.schedule = "cosine"
  c.weight_decay = 0.0

  # Curation.
  c.top_fraction = 0.1
  c.percentiles = "90,95,98"  # stratified oversampling; "" uses top_fraction instead
  c.quality_beta = 0.1  # SFT(Q): sample/weight ∝ exp(normalised return / beta)
  c.quality_mode = "sample"  # "sample" or "weight"

  # iw-SFT.
  c.weighting = "sequence"  # "sequence" (per episode) or "step"
  c.temperature = 10.0
  c.w_min = 0.0
  c.w_max = 1000.0
  c.self_normalise = True
  c.step_w_min = 0.0
  c.step_w_max = 2.0
  c.length_normalise = True
  c.q_decay = 0.9

  # Policy.
  c.hidden = "256,256,256"
  c.state_dependent_std = False

  # Evaluation and logging.
  c.eval_every = 500
  c.eval_episodes = 10
  c.final_eval_episodes = 100
  c.steps_per_dispatch = 50

  # Checkpoints and failures.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.skip_nonfinite = False
  return c


# The 2-core CPU scale of the recipe (the demo and the default sweep): fewer, smaller updates and
# evaluations; the same methods and objectives.
CPU_SETTINGS = dict(eval_every=200, eval_episodes=5, final_eval_episodes=20, steps_per_dispatch=100,
                    steps=600, batch_size=32, warmup_steps=50, learning_rate=1e-4)
CPU_REFERENCE = dict(batch_level="step", batch_size=256, steps=3000)


# The default sweep's scale: 30 fine-tuning runs per dataset, and medium-expert's 1000-step expert
# episodes make whole-episode batches 4x as long as medium's, so batches of 8 episodes, 400 updates.
CPU_SWEEP_SETTINGS = dict(CPU_SETTINGS, batch_size=8, steps=400, warmup_steps=30)
PRESETS = ("cpu", "cpu-sweep", "paper")


def get_cpu_config() -> ml_collections.ConfigDict:
  """get_config() scaled to a 2-core CPU (CPU_SETTINGS, CPU_REFERENCE)."""
  return preset_config("cpu")


def preset_config(name: str) -> ml_collections.ConfigDict:
  """'paper': get_config(), the authors' recipe; 'cpu': the demo's 2-core scale; 'cpu-sweep': the
  default sweep's (smaller fine-tuning batches)."""
  c = get_config()
  if name != "paper":
    c.update(CPU_SWEEP_SETTINGS if name == "cpu-sweep" else CPU_SETTINGS)
    c.reference.update(CPU_REFERENCE)
  return c
