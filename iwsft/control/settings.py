"""A control config, validated once into frozen settings before anything is read or written.

Everything a stage of the control pipeline reads is here; stages never read the raw config.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from iwsft.control.config import METHODS, WEIGHTED
from iwsft.control.policy import PolicyConfig
from iwsft.core import curation
from iwsft.core.config import StageConfig, check_micro_batches, objective_config, stage_config
from iwsft.core.objectives import ObjectiveConfig
from iwsft.errors import UserError
from iwsft.io import checkpoint, tracking
from iwsft.io import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  every: int  # evaluate every this many updates; 0: only at the end
  episodes: int  # per evaluation during training
  final_episodes: int
  video_episodes: int


@dataclasses.dataclass(frozen=True)
class CurationSettings:
  percentiles: tuple[float, ...]  # stratified oversampling; () uses top_fraction
  top_fraction: float
  quality_beta: float
  quality_mode: str  # SFT(Q): curation.QUALITY_MODES


@dataclasses.dataclass(frozen=True)
class Settings:
  """A control config, validated once. `config` is the config as a JSON-able dict (result.json)."""

  config: dict
  dataset: str
  method: str
  download: bool
  num_devices: int
  seeds_over_devices: bool
  micro_batches: int
  val_fraction: float
  reference: StageConfig
  finetune: StageConfig | None  # None for method "bc" (π_ref itself)
  reference_objective: ObjectiveConfig
  objective: ObjectiveConfig
  policy: PolicyConfig
  normalise_observations: bool
  tracking: tracking.TrackingConfig
  eval: EvalSettings
  curation: CurationSettings
  pack_batches: bool
  precompute_ref: bool
  steps_per_dispatch: int
  checkpoint_every: int
  keep_checkpoints: int
  skip_nonfinite: bool


def validate(cfg) -> Settings:
  """Checks every setting of a control config; a UserError names the first bad one."""
  if cfg.method not in METHODS:
    raise UserError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
  ev = EvalSettings(**cfg.eval.to_dict())
  if ev.episodes < 1 or ev.final_episodes < 1 or ev.every < 0:
    raise UserError("eval.episodes and eval.final_episodes must be >= 1, eval.every >= 0")
  if ev.video_episodes < 0:
    raise UserError(f"eval.video_episodes must be >= 0, got {ev.video_episodes}")
  checkpoint.check_checkpoint_settings(cfg.checkpoint_every, cfg.keep_checkpoints)
  cur = _curation(cfg.curation)
  hidden = tuple(cfg.policy.hidden)
  if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
    raise UserError(f"policy.hidden must list positive layer widths, got {cfg.policy.hidden!r}")
  if cfg.steps_per_dispatch < 1:
    raise UserError(f"steps_per_dispatch must be >= 1, got {cfg.steps_per_dispatch}")
  finetune = None if cfg.method == "bc" else stage_config(cfg.finetune, "finetune")
  check_micro_batches(cfg.micro_batches, (stage_config(cfg.reference, "reference"), finetune))
  if cfg.micro_batches > 1 and cfg.pack_batches:
    raise UserError("micro_batches > 1 needs pack_batches=False (packed batches do not split)")
  objective = objective_config(cfg.objective, weighted=cfg.method in WEIGHTED)
  if objective.importance_weighting == "sequence" and finetune.batch_level == "step":
    raise UserError(
      "per-episode importance weights need finetune.batch_level=episode "
      "(or objective.importance_weighting=step)"
    )
  reference_objective = dataclasses.replace(
    objective_config(cfg.objective, weighted=False), q_decay=0.0
  )
  return Settings(
    config=workdir_lib.canonical(cfg.to_dict()),
    dataset=cfg.dataset,
    method=cfg.method,
    download=bool(cfg.download),
    num_devices=cfg.num_devices,
    seeds_over_devices=bool(cfg.seeds_over_devices),
    micro_batches=cfg.micro_batches,
    val_fraction=cfg.val_fraction,
    reference=stage_config(cfg.reference, "reference"),
    finetune=finetune,
    reference_objective=reference_objective,
    objective=objective,
    policy=PolicyConfig(hidden=hidden, state_dependent_std=cfg.policy.state_dependent_std),
    normalise_observations=bool(cfg.policy.normalise_observations),
    tracking=tracking.tracking_config(cfg.log),
    eval=ev,
    curation=cur,
    pack_batches=bool(cfg.pack_batches),
    precompute_ref=bool(cfg.precompute_ref),
    steps_per_dispatch=cfg.steps_per_dispatch,
    checkpoint_every=cfg.checkpoint_every,
    keep_checkpoints=cfg.keep_checkpoints,
    skip_nonfinite=bool(cfg.skip_nonfinite),
  )


def _curation(section) -> CurationSettings:
  c = CurationSettings(
    percentiles=tuple(float(p) for p in section.percentiles),
    top_fraction=section.top_fraction,
    quality_beta=section.quality_beta,
    quality_mode=section.quality_mode,
  )
  try:
    curation.check_top_fraction(c.top_fraction)
    curation.check_percentiles(c.percentiles)
    curation.check_quality(c.quality_beta, c.quality_mode)
  except UserError as e:
    raise UserError(f"curation.{e}") from None
  return c


def curation_for(
  method: str, returns: np.ndarray, c: CurationSettings
) -> tuple[np.ndarray, np.ndarray]:
  """-> (sampling logits [N], data weights [N]) of a method over the episodes' returns [N]."""
  logits = curation.sampling_logits(
    returns,
    method,
    top_fraction=c.top_fraction,
    percentiles=c.percentiles,
    quality_beta=c.quality_beta,
    quality_mode=c.quality_mode,
  )
  weight = np.ones(len(returns), np.float32)
  if method in ("sft_q", "iw_sft_q") and c.quality_mode == "weight":
    weight = curation.quality_weights(returns, c.quality_beta).astype(np.float32)
  return logits, weight
