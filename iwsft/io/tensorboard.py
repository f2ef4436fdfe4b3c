"""TensorBoard event files of the metrics rows (tensorboardX: no TensorFlow needed).

A row {"kind": "train" | "eval", "stage": ..., "step": ..., <metric>: value, ...} becomes one
scalar per numeric metric, tagged "<stage>/<kind>/<metric>" with the metrics.jsonl names
(e.g. "iw_sft/train/iw/ess_fraction", "reference/eval/normalised_score"), at the row's step.
Point TensorBoard at a workdir, or at a sweep's, to see every run (each run's directory is its
name there). A resumed run appends a new event file; TensorBoard shows steps logged again after a
resume as a second point.
"""

from __future__ import annotations

import math
import numbers


class TensorBoard:
  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(logdir=logdir, flush_secs=30)

  def __call__(self, row: dict) -> None:
    prefix = f"{row.get('stage', 'run')}/{row.get('kind', 'row')}"
    step = int(row.get("step", 0))
    for key, value in row.items():
      if key in ("step", "kind", "stage") or isinstance(value, bool):
        continue
      if isinstance(value, numbers.Real) and math.isfinite(value):
        self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
    if row.get("kind") == "eval":
      self.writer.flush()

  def close(self) -> None:
    self.writer.close()
