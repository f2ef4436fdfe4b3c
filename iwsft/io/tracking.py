"""Experiment tracking: where a run's metrics rows go besides metrics.jsonl.

Both pipelines open their logs through `open_log`, which adds to metrics.jsonl
  - TensorBoard event files in tensorboard/<stage>/ beside it (on by default; tensorboardX; rows
    dropped when a stage resumes from a checkpoint are purged there too), and
  - a Weights & Biases run (off by default; `--config.log.wandb=true`, offline unless
    `--config.log.wandb_mode=online`; `pip install 'iwsft[wandb]'`; a resumed stage logs its
    steps again there, since W&B keeps what a run has logged),
all with the same tags, "<stage>/<train|eval>/<metric name of metrics.jsonl>".
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

from iwsft.errors import UserError
from iwsft.io import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
  """tensorboard: write TensorBoard event files. wandb: log to Weights & Biases, in wandb_mode
  "offline" (files under <run>/wandb, `wandb sync` uploads them later) or "online"; wandb_group
  groups runs in its UI (a sweep sets its own name when this is empty)."""

  tensorboard: bool = True
  wandb: bool = False
  wandb_project: str = "iwsft"
  wandb_mode: str = "offline"
  wandb_group: str = ""

  def __post_init__(self):
    if self.wandb_mode not in ("offline", "online"):
      raise UserError(f"log.wandb_mode must be 'offline' or 'online', got {self.wandb_mode!r}")
    if self.wandb:
      try:
        import wandb  # noqa: F401
      except ImportError:
        raise UserError("log.wandb needs Weights & Biases: pip install 'iwsft[wandb]'") from None


def tracking_config(section) -> TrackingConfig:
  return TrackingConfig(**section.to_dict())


def scalars(row: dict) -> tuple[str, int, dict[str, float]]:
  """A metrics row -> (its stage, its step, {tag: value} of its finite numeric metrics)."""
  stage, step = str(row.get("stage", "run")), int(row.get("step", 0))
  prefix = f"{stage}/{row.get('kind', 'row')}"
  out = {}
  for key, value in row.items():
    if key in ("step", "kind", "stage") or isinstance(value, bool):
      continue
    if isinstance(value, numbers.Real) and math.isfinite(value):
      out[f"{prefix}/{key}"] = float(value)
  return stage, step, out


class _TensorBoard:
  """One event-file directory per stage, tensorboard/<stage>/, since TensorBoard's purge on a
  resume hides every tag of a directory at and past a step, and stages count steps separately."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self.writers: dict = {}
    self.purge_from: dict[str, int] = {}

  def _writer(self, stage: str):
    if stage not in self.writers:
      from tensorboardX import SummaryWriter

      logdir = os.path.join(self.logdir, stage)
      earlier = len(os.listdir(logdir)) if os.path.isdir(logdir) else 0
      self.writers[stage] = SummaryWriter(
        logdir=logdir,
        flush_secs=30,
        purge_step=self.purge_from.pop(stage, None),
        # a file of its own even when opened within the second of the last one (a fast resume)
        filename_suffix=f".{earlier:04d}",
      )
    return self.writers[stage]

  def __call__(self, row: dict) -> None:
    stage, step, values = scalars(row)
    writer = self._writer(stage)
    for tag, value in values.items():
      writer.add_scalar(tag, value, step)
    if row.get("kind") == "eval":
      writer.flush()

  def purge(self, stage: str, step: int) -> None:
    """The stage's rows past `step` were dropped (all of them for step 0): its next event file
    starts with a purge marker, so TensorBoard hides what the earlier files hold from there on."""
    if stage in self.writers:
      self.writers.pop(stage).close()
    self.purge_from[stage] = step + 1 if step else 0

  def close(self) -> None:
    for writer in self.writers.values():
      writer.close()


class _Wandb:
  """One W&B run; each stage counts its own steps ("<stage>/step" is its x-axis)."""

  def __init__(self, cfg: TrackingConfig, directory: str, name: str, config: dict | None):
    import wandb

    self.run = wandb.init(
      project=cfg.wandb_project,
      name=name,
      group=cfg.wandb_group or None,
      dir=directory,
      mode=cfg.wandb_mode,
      config=config,
      reinit="create_new",
    )
    self.stages: set[str] = set()

  def __call__(self, row: dict) -> None:
    stage, step, values = scalars(row)
    if stage not in self.stages:
      self.stages.add(stage)
      self.run.define_metric(f"{stage}/step")
      self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    self.run.log({**values, f"{stage}/step": step})

  def purge(self, stage: str, step: int) -> None:
    """Nothing to hide: W&B keeps what a run logged, so a resumed stage's steps appear twice."""

  def close(self) -> None:
    self.run.finish()


def open_log(
  path: str, cfg: TrackingConfig, name: str = "", config: dict | None = None
) -> workdir_lib.MetricsLog:
  """metrics.jsonl at `path`, with the sinks cfg asks for in the same directory; `name` (the run's
  name in W&B) defaults to that directory's path."""
  directory = os.path.dirname(os.path.abspath(path))
  sinks = []
  if cfg.tensorboard:
    sinks.append(_TensorBoard(os.path.join(directory, "tensorboard")))
  if cfg.wandb:
    sinks.append(_Wandb(cfg, directory, name or directory, config))
  return workdir_lib.MetricsLog(path, sinks)
