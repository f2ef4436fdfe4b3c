"""Training-stage settings and the optimiser built from them (shared by both pipelines)."""

from __future__ import annotations

import dataclasses

import optax

from iwsft.errors import UserError


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: steps, batch and optimiser."""

  steps: int
  batch_size: int
  learning_rate: float
  batch_level: str = "episode"
  warmup_steps: int = 0
  schedule: str = "constant"
  weight_decay: float = 0.0
  adam_b2: float = 0.999

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
    if not 0 <= self.warmup_steps < self.steps:
      raise UserError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


def make_optimizer(stage: StageConfig) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and cosine decay to 0 (the authors' fine-tuning schedule)."""
  if stage.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, stage.learning_rate, stage.warmup_steps,
                                            stage.steps, end_value=0.0)
  elif stage.warmup_steps:
    lr = optax.join_schedules([optax.linear_schedule(0.0, stage.learning_rate, stage.warmup_steps),
                               optax.constant_schedule(stage.learning_rate)], [stage.warmup_steps])
  else:
    lr = stage.learning_rate
  if stage.weight_decay:
    return optax.adamw(lr, b2=stage.adam_b2, weight_decay=stage.weight_decay)
  return optax.adam(lr, b2=stage.adam_b2)
