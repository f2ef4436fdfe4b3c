"""Configuration of the control pipeline: `get_config(preset)`, an ml_collections config file.

  experiments/control.py --config=iwsft/control/config.py:cpu --config.method=filtered_bc

Presets: "paper" (the default) is the authors' recipe (docs/objectives.md), which assumes a GPU
(batches of 128-256 whole 1000-step episodes); "cpu" is the demo's 2-core scale; "cpu-sweep" the
default sweep's (smaller fine-tuning batches). Two stages, as the authors run them:
  reference: BC on all episodes; this is π_ref, and the result of method "bc".
  finetune:  filtered BC / iw-SFT / SFT(Q) / iw-SFT(Q), starting from π_ref's weights.
"""

from __future__ import annotations

import ml_collections

from iwsft.core.config import log_section, objective_section, stage_section

METHODS = ("bc", "filtered_bc", "iw_sft", "sft_q", "iw_sft_q", "bc_continued")
# bc_continued: the control for "more training": π_ref fine-tuned on all episodes with the
# fine-tuning stage's updates and schedule, unweighted (what filtered BC is, without the filter)
WEIGHTED = ("iw_sft", "iw_sft_q")  # the methods that use importance weights
# each weighted method and the method it is with every weight 1 (same curated batches, same π_ref)
UNWEIGHTED = {"iw_sft": "filtered_bc", "iw_sft_q": "sft_q"}
# each curated method and the control with the same training but no curation
CONTROLS = {"filtered_bc": "bc_continued", "sft_q": "bc_continued"}
PRESETS = ("paper", "cpu", "cpu-sweep")


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.pipeline = "control"
  c.dataset = "iwsft/hopper-small/medium-replay-v1"  # a Minari id (local unless download)
  c.method = "iw_sft"  # one of METHODS
  c.seed = 0
  c.download = False  # fetch the dataset from Minari's servers when it is not local
  c.num_devices = 0  # devices of the data-parallel mesh; 0: all
  # seeds trained together (a sweep's groups): split the seeds over the devices, each training
  # its seeds on whole batches, instead of splitting every batch over all devices
  c.seeds_over_devices = False
  # gradients accumulated over this many parts of each batch: the same update with the
  # activations of one part at a time (needs pack_batches=False for whole-episode batches)
  c.micro_batches = 1
  c.val_fraction = 0.0  # episodes held out for a validation NLL (seeds trained alone only)

  # Stage 1, π_ref = BC on all data. batch_level: "episode" (whole padded episodes) or "step".
  c.reference = stage_section(steps=10_000, batch_size=128, learning_rate=1e-3)
  # Stage 2, the method fine-tuned from π_ref: linear warm-up, then cosine decay to 0.
  c.finetune = stage_section(
    steps=2_000, batch_size=256, learning_rate=4e-5, warmup_steps=300, schedule="cosine"
  )

  c.curation = _curation_section()

  # iw-SFT (fields of core.objectives.ObjectiveConfig): per-episode weight
  # clip(exp(temperature · mean log q/π_ref), [w_min, w_max]), self-normalised; per-step variant
  # with importance_weighting="step"; q an EMA of the policy with decay q_decay.
  c.objective = objective_section()

  c.policy = _policy_section()
  c.eval = _eval_section()

  # Where metrics go besides metrics.jsonl: TensorBoard (tensorboard), Weights & Biases (wandb,
  # wandb_project, wandb_mode offline|online, wandb_group).
  c.log = log_section()

  # Exact savings (the same objective, computed with less work): episode batches packed, so the
  # policy runs on their real steps only, not on padding (core/packing.py); π_ref's log-probs
  # computed once over the data for fine-tuning, not in every batch (π_ref is frozen).
  c.pack_batches = True
  c.precompute_ref = True
  c.steps_per_dispatch = 50  # updates per jitted call (lax.scan)
  c.checkpoint_every = 1000  # save the training state every this many updates
  c.keep_checkpoints = 2  # latest checkpoints kept (the best evaluated one is kept too)
  c.skip_nonfinite = False  # skip NaN/inf batches instead of stopping with exit status 1
  if preset not in PRESETS:
    raise ValueError(f"unknown control preset {preset!r}; choose from {', '.join(PRESETS)}")
  if preset != "paper":
    _scale_to_cpu(c, sweep=preset == "cpu-sweep")
  return c


def _curation_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.percentiles = (90.0, 95.0, 98.0)  # stratified oversampling; () uses top_fraction
  c.top_fraction = 0.1  # filtered BC keeps this top fraction by return
  c.quality_beta = 0.1  # SFT(Q): episodes ∝ exp(normalised return / beta)
  # SFT(Q): "sample" episodes ∝ exp(normalised return / beta), "weight" their losses by it, or
  # "linear": sample ∝ the normalised return (beta unused)
  c.quality_mode = "sample"
  return c


def _policy_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.hidden = (256, 256, 256)  # hidden widths of the policy MLP
  c.state_dependent_std = False  # the authors' log-std is a free parameter
  # standardise observations with the training data's mean and std (stored in the policy); the
  # authors' control code does not, so the paper preset does not either
  c.normalise_observations = False
  return c


def _eval_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every = 500  # evaluate every this many updates; 0: only at the end
  c.episodes = 10  # episodes per evaluation during training
  c.final_episodes = 100  # episodes of the final evaluation
  c.video_episodes = 0  # record this many final-policy episodes to video.gif (MUJOCO_GL=egl)
  return c


def dataset_recipe(dataset: str, preset: str = "paper") -> ml_collections.ConfigDict:
  """The recipe of a preset on one dataset: what each per-dataset file in configs/control/
  returns (as CORL keeps one file per dataset; a dataset's own settings go there)."""
  c = get_config(preset)
  c.dataset = dataset
  return c


def load_file(spec: str) -> ml_collections.ConfigDict:
  """A config file "path.py" or "path.py:arg" -> its get_config(arg) (UserError if it fails)."""
  import importlib.util
  import os

  from iwsft.errors import UserError

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist")
  try:
    module_spec = importlib.util.spec_from_file_location("iwsft_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001  the file's own error, as one line
    raise UserError(f"config file {spec!r} failed to load: {type(e).__name__}: {e}") from None


def _scale_to_cpu(c: ml_collections.ConfigDict, sweep: bool) -> None:
  """The recipe at a 2-core CPU's scale: fewer, smaller updates and evaluations, same objectives.

  The sweep runs 30 fine-tunings per dataset, and medium-expert's 1000-step expert episodes make
  whole-episode batches 4x as long as medium's: batches of 8 episodes and 400 updates there.
  """
  c.eval.update(every=200, episodes=5, final_episodes=20)
  c.policy.normalise_observations = True  # as the CPU presets' published numbers were made
  c.steps_per_dispatch = 100
  c.reference.update(batch_level="step", batch_size=256, steps=3000)
  c.finetune.update(steps=600, batch_size=32, warmup_steps=50, learning_rate=1e-4)
  if sweep:
    c.finetune.update(batch_size=8, steps=400, warmup_steps=30)
