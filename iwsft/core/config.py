"""Config sections shared by both pipelines, and the one place that turns them into settings.

A pipeline config (control/config.py, lm/config.py) nests one `stage_section` per training stage
and one `objective_section`; their keys are exactly the fields of StageConfig and ObjectiveConfig,
so a new setting is added to the dataclass (with its default) and appears in every config and on
every command line. `stage_config` / `objective_config` validate a section once and turn bad values
into a one-line UserError.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from iwsft.core.objectives import ObjectiveConfig
from iwsft.errors import UserError
from iwsft.io.tracking import TrackingConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: steps, batch and optimiser.

  batch_level: "episode" (whole padded sequences) or "step" (single steps; control only).
  schedule: "constant" (after an optional linear warm-up) or "cosine" (warm-up, then decay to 0).
  weight_decay: AdamW's decoupled weight decay of weight matrices (0: plain Adam); norms and
    biases are not decayed (as Hugging Face's Trainer).
  clip_norm: clip the gradient to this global norm first (0: no clipping).
  moment_dtype: the type Adam's moments are kept in: "" (the parameters' own), "float32" (e.g.
    beside bfloat16 parameters) or "bfloat16".
  """

  steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 1e-3
  batch_level: str = "episode"
  warmup_steps: int = 0
  schedule: str = "constant"
  weight_decay: float = 0.0
  adam_b2: float = 0.999
  clip_norm: float = 0.0
  moment_dtype: str = ""

  def __post_init__(self):
    if self.steps < 1:
      raise UserError(f"steps must be >= 1, got {self.steps}")
    if self.batch_size < 1:
      raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
    if not self.learning_rate > 0:
      raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.batch_level not in ("episode", "step"):
      raise UserError(f"batch_level must be 'episode' or 'step', got {self.batch_level!r}")
    if self.schedule not in ("constant", "cosine"):
      raise UserError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if self.clip_norm < 0 or self.weight_decay < 0:
      raise UserError("clip_norm and weight_decay must be >= 0")
    if self.moment_dtype not in ("", "float32", "bfloat16"):
      raise UserError(
        f"moment_dtype must be '', 'float32' or 'bfloat16', got {self.moment_dtype!r}"
      )
    if not 0 <= self.warmup_steps < self.steps:
      raise UserError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


def _section(cls, values: dict) -> ml_collections.ConfigDict:
  fields = {f.name: f.default for f in dataclasses.fields(cls)}
  unknown = set(values) - set(fields)
  if unknown:
    raise KeyError(f"{cls.__name__} has no fields {sorted(unknown)}")
  return ml_collections.ConfigDict({**fields, **values})


def stage_section(**values) -> ml_collections.ConfigDict:
  """A config section with every StageConfig field: its defaults, overridden by `values`."""
  return _section(StageConfig, values)


def objective_section(**values) -> ml_collections.ConfigDict:
  """A config section with every ObjectiveConfig field. Its importance_weighting ("sequence" or
  "step") applies to the importance-weighted methods; the others train with "none"."""
  return _section(ObjectiveConfig, {"importance_weighting": "sequence", **values})


def log_section(**values) -> ml_collections.ConfigDict:
  """A config section with every TrackingConfig field: TensorBoard on, W&B off."""
  return _section(TrackingConfig, values)


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of cfg with each dotted key ("finetune.steps") set to its value: the one way the
  scripts derive a run's config from another. An unknown key is a UserError."""
  out = cfg.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, name = key.split(".")
    target = out
    for part in path:
      target = target.get(part) if isinstance(target, ml_collections.ConfigDict) else None
    if not isinstance(target, ml_collections.ConfigDict) or name not in target:
      raise UserError(f"the config has no setting {key!r}")
    target[name] = value
  return out


def stage_config(section, what: str = "stage") -> StageConfig:
  """A validated StageConfig from a stage_section."""
  try:
    return StageConfig(**section.to_dict())
  except UserError as e:
    raise UserError(f"{what}: {e}") from None


def objective_config(section, weighted: bool) -> ObjectiveConfig:
  """A validated ObjectiveConfig from an objective_section; weighted=False gives SFT / BC."""
  values = section.to_dict()
  if values["importance_weighting"] not in ("sequence", "step"):
    raise UserError(
      "objective.importance_weighting must be 'sequence' or 'step', got "
      f"{values['importance_weighting']!r}"
    )
  if not weighted:
    values["importance_weighting"] = "none"
  try:
    return ObjectiveConfig(**values)
  except ValueError as e:
    raise UserError(f"objective: {e}") from None


def check_micro_batches(micro_batches: int, stages) -> None:
  """micro_batches (>= 1) divides every stage's batch_size (StageConfigs or None), else a
  UserError; the devices' share is checked where the mesh is known (sharding.check_batch_size)."""
  if not isinstance(micro_batches, int) or micro_batches < 1:
    raise UserError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
  for st in stages:
    if st is not None and st.batch_size % micro_batches:
      raise UserError(f"micro_batches {micro_batches} must divide batch_size {st.batch_size}")


def make_optimizer(stage: StageConfig, matrices=None) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and cosine decay to 0 (the authors' fine-tuning
  schedule). matrices(params) -> a bool per leaf: the weight matrices that weight decay applies
  to (default: leaves of 2 or more dimensions)."""
  if stage.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
      0.0, stage.learning_rate, stage.warmup_steps, stage.steps, end_value=0.0
    )
  elif stage.warmup_steps:
    lr = optax.join_schedules(
      [
        optax.linear_schedule(0.0, stage.learning_rate, stage.warmup_steps),
        optax.constant_schedule(stage.learning_rate),
      ],
      [stage.warmup_steps],
    )
  else:
    lr = stage.learning_rate
  if stage.weight_decay:  # decoupled decay of matrices only: not of norms, biases (or scalars)
    decay = matrices or (lambda params: jax.tree.map(lambda x: x.ndim >= 2, params))
    opt = optax.adamw(lr, b2=stage.adam_b2, weight_decay=stage.weight_decay, mask=decay)
  else:
    opt = optax.adam(lr, b2=stage.adam_b2)
  if stage.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(stage.clip_norm), opt)
  return with_state_dtype(opt, stage.moment_dtype) if stage.moment_dtype else opt


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` with its state (Adam's moments) kept in `dtype`: gradients and parameters are cast
  to it on the way in, and the updates back to the gradients' own types."""

  def cast(tree, to):
    return jax.tree.map(
      lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

  def init(params):
    return inner.init(cast(params, dtype))

  def update(updates, state, params=None):
    types = jax.tree.map(lambda x: x.dtype, updates)
    params = None if params is None else cast(params, dtype)
    out, state = inner.update(cast(updates, dtype), state, params)
    return jax.tree.map(lambda x, t: x.astype(t), out, types), state

  return optax.GradientTransformation(init, update)
