"""One grid runner for both pipelines: methods × datasets × seeds, resumable cells, tables, figures.

A pipeline's grid says what its cells are and how to run a group of them; `run_sweep` does the rest
the same way for both: claim the workdir, plan (finished cells are skipped), run the groups, then
summarise every cell's score into table.md / table.csv / cells.csv, with what the importance
weights change per seed (paired.csv) and the weights' diagnostics (weights.csv), and draw the
figures.

The grids are iwsft.control.grid.ControlGrid and iwsft.lm.grid.LMGrid (their layouts are there).
A grid has: cfg, methods, datasets, seeds, pairs ({weighted method: unweighted}), controls ({curated
method: the same training without curation}), score_label, across_datasets (whether its
datasets are separate tasks that rliable's aggregates may pool), and validate(), identity() (and
optionally defaults(): the identity of the default settings, so that a setting added after a sweep
was recorded matches at its default), plan(workdir), describe(group), prepare(), run(group,
workdir), records(workdir) (a CellRecord per finished cell, read by the pipeline from its own
cells), training_data(dataset), extra_tables(records, workdir) and figures(records, workdir). The
engine reads nothing of a cell but its record.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Mapping, Sequence

from iwsft.errors import UserError
from iwsft.io import plots, report
from iwsft.io import workdir as workdir_lib

CELL_COLUMNS = [
  "dataset",
  "method",
  "seed",
  "score",
  "return_mean",
  "wall_time_s",
  "seeds_trained_together",
  "cell",
  "divergence",
]


@dataclasses.dataclass(frozen=True)
class CellRecord:
  """A finished cell as its pipeline reports it to the engine.

  score: the cell's headline number (the grid's score_label); return_mean: the raw return
  (control); cell: the cell's directory. weights: the importance weights' diagnostics
  (report.WEIGHT_DIAGNOSTICS) averaged over the cell's own training, for weighted methods (None
  for the others). curves: {series: (steps [S], values [S])} logged while training, for the
  figures. outcomes: per-problem correctness behind the score [P] (LM cells), for paired tests.
  divergence: how far fine-tuning moved the policy from π_ref, the mean log θ/π_ref over the
  curated sequences at the end (control cells with a fine-tuning stage).
  """

  dataset: str
  method: str
  seed: int
  score: float
  cell: str
  return_mean: float | None = None
  wall_time_s: float | None = None
  seeds_trained_together: int = 1
  weights: Mapping[str, float] | None = None
  curves: Mapping[str, tuple[Sequence[int], Sequence[float]]] = dataclasses.field(
    default_factory=dict
  )
  outcomes: Sequence[bool] | None = None
  divergence: float | None = None

  def row(self) -> dict:
    """The record's CELL_COLUMNS: a cells.csv row, and what iwsft.io.report reads."""
    return {c: getattr(self, c) for c in CELL_COLUMNS}


def score_rows(recs: Sequence[CellRecord]) -> list[dict]:
  """The records as iwsft.io.report's rows ({dataset, method, seed, score, ...})."""
  return [r.row() for r in recs]


def run_sweep(
  grid,
  workdir: str,
  overwrite: bool = False,
  dry_run: bool = False,
  bootstrap_seed: int = 0,
  header: str = "",
  say=print,
  part: tuple[int, int] = (0, 1),
) -> dict:
  """Runs what is left of a grid in workdir, then writes its tables and figures; returns
  sweep.json.

  part (i, k): run only the i-th of k parts of the grid (its keys, grid.keys(), dealt out in
  turn), so that k processes, on one host or several sharing the workdir, split the grid; the
  part that finds every cell finished writes the tables of all of them."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  _check_part(part, overwrite)
  grid.validate()
  identity = {"pipeline": grid.cfg.pipeline, "config": grid.identity()}
  defaults = {"config": grid.defaults()} if hasattr(grid, "defaults") else None
  if dry_run:
    return _dry_run(grid, workdir, identity, defaults, part, say)
  _claim(workdir, identity, overwrite, defaults)
  if not grid.cfg.log.wandb_group:  # the sweep's runs as one group in W&B
    grid.cfg.log.wandb_group = os.path.basename(workdir)
  todo = _mine(grid, grid.plan(workdir), part)  # after any removal by _claim
  say(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
  grid.prepare()
  for i, group in enumerate(todo):
    say(f"[{i + 1}/{len(todo)}] {grid.describe(group)}")
    grid.run(group, workdir)
  others = grid.plan(workdir)
  if others:  # only with parts: another process is still running these
    say(f"part {part[0]}/{part[1]} finished; {len(others)} run(s) of other parts left to finish")
    return {}
  recs = grid.records(workdir)
  outputs = _write_tables(grid, recs, workdir, bootstrap_seed, header, say)
  outputs += grid.figures(recs, workdir)
  info = {
    "wall_time_s": round(time.time() - t0, 1),
    "runs_this_invocation": len(todo),
    "cells": len(recs),
    "seeds": list(grid.seeds),
    "methods": grid.methods,
    "datasets": grid.datasets,
  }
  workdir_lib.write_json(os.path.join(workdir, "sweep.json"), info)
  say(
    f"{len(recs)} cells; this invocation ran {len(todo)} run(s) in {info['wall_time_s']:.0f} s "
    f"-> {workdir}/{{{','.join(outputs)}}}"
  )
  return info


def _check_part(part: tuple[int, int], overwrite: bool) -> None:
  index, parts = part
  if not 0 <= index < parts:
    raise UserError(f"--part must lie in [0, --parts={parts}), got {index}")
  if parts > 1 and overwrite:
    raise UserError("--overwrite with --parts: one part would remove another's cells")


def _dry_run(grid, workdir: str, identity: dict, defaults, part: tuple[int, int], say) -> dict:
  """Says what a run would do (or that the workdir holds other settings), changing nothing."""
  changed = workdir_lib.settings_difference(workdir, identity, defaults)
  if changed:
    say(f"{workdir} holds a sweep with other settings ({changed}): --overwrite reruns every cell")
    return {}
  todo = _mine(grid, grid.plan(workdir), part)
  say(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
  say("\n".join(grid.describe(g) for g in todo))
  return {}


def _mine(grid, groups: list, part: tuple[int, int]) -> list:
  """The groups of part (i, k): those whose key is i-th, (i + k)-th, ... of grid.keys()."""
  index, parts = part
  keys = grid.keys()
  return [g for g in groups if keys.index(grid.key(g)) % parts == index]


def _claim(workdir: str, identity: dict, overwrite: bool, defaults: dict | None) -> None:
  """Records the sweep's settings; with overwrite, removes cells made with other settings."""
  _, changed = workdir_lib.claim_workdir(workdir, identity, overwrite, "", defaults)
  if changed:  # only with overwrite
    for name in os.listdir(workdir):
      if name != "run.json":
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _write_tables(grid, recs, workdir: str, bootstrap_seed: int, header: str, say) -> list[str]:
  rows = score_rows(recs)
  summary = report.summarise(rows)
  table = report.markdown_table(summary, grid.methods, grid.datasets)
  seeds = ",".join(map(str, grid.seeds))
  text = (
    f"{grid.score_label}: mean ± std [95% Student-t CI of the mean] over seeds {seeds}"
    f"{' (' + header + ')' if header else ''}\n\n{table}\n"
  )
  paired_text, paired_outputs = _write_paired(grid, rows, workdir)
  weights_text, weights_outputs = _write_weights(grid, recs, workdir)
  aggregate_text, aggregate_outputs = _write_aggregate(grid, rows, workdir, bootstrap_seed)
  extra_text, extra_outputs = grid.extra_tables(recs, workdir)
  text += paired_text + extra_text + aggregate_text + weights_text
  outputs = ["table.md", "table.csv", "cells.csv", *paired_outputs, *aggregate_outputs]
  outputs += extra_outputs + weights_outputs
  say("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  report.write_csv(os.path.join(workdir, "table.csv"), summary, report.SUMMARY_COLUMNS)
  cells = [dict(r, cell=os.path.relpath(r["cell"], workdir)) for r in rows]  # movable with it
  report.write_csv(os.path.join(workdir, "cells.csv"), cells, CELL_COLUMNS)
  return outputs


def _write_aggregate(grid, rows, workdir: str, bootstrap_seed: int) -> tuple[str, list[str]]:
  """Across datasets (report.aggregate): each method's IQM and each weighted method's probability
  of improvement over its unweighted counterpart; a section of table.md and aggregate.csv."""
  if not grid.across_datasets:
    return "", []
  iqm, poi = report.aggregate(rows, grid.methods, grid.pairs, seed=bootstrap_seed)
  if not iqm:
    return "", []
  report.write_aggregate(os.path.join(workdir, "aggregate.csv"), iqm, poi)
  text = (
    "\nAcross datasets (rliable): interquartile mean of the scores over datasets × seeds, and the"
    " probability that a weighted method scores above its unweighted counterpart on a dataset;"
    " 95% stratified-bootstrap CIs\n\n"
    f"{report.aggregate_text(iqm, poi)}\n"
  )
  return text, ["aggregate.csv"]


def _write_paired(grid, rows, workdir: str) -> tuple[str, list[str]]:
  """What the importance weights change and what curation changes (report.paired_differences over
  grid.pairs and grid.controls): a section of table.md (returned), paired.csv and paired.png;
  nothing when no pair is in the grid."""
  paired = report.paired_differences(rows, {**grid.pairs, **grid.controls})
  if not paired:
    return "", []
  report.write_csv(os.path.join(workdir, "paired.csv"), paired, report.PAIRED_COLUMNS)
  plots.paired_differences(
    paired,
    os.path.join(workdir, "paired.png"),
    f"difference in {grid.score_label}",
    "paired differences, per seed; mean and 95% CI over seeds " + ",".join(map(str, grid.seeds)),
    label=lambda d: d.split("/", 1)[-1],
  )
  text = (
    "\nPaired by seed (same π_ref, same random stream): what the importance weights change (each"
    " weighted method minus the same method with every weight 1) and, where bc_continued ran,"
    " what curation changes over the same training (a curated method minus bc_continued); mean"
    " [95% Student-t CI] of the differences, and on how many seeds the first scored higher or"
    " lower\n\n"
    f"{report.paired_table(paired, grid.datasets)}\n"
  )
  return text, ["paired.csv", "paired.png"]


def _write_weights(grid, recs, workdir: str) -> tuple[str, list[str]]:
  """The weights' diagnostics of every weighted method (grid.pairs): per seed averaged over
  fine-tuning, then over seeds; a section of table.md (returned) and weights.csv."""
  per_seed: dict[tuple[str, str], dict[int, dict]] = {}
  for r in recs:
    if r.method in grid.pairs and r.weights is not None:
      per_seed.setdefault((grid.training_data(r.dataset), r.method), {})[r.seed] = r.weights
  rows = []
  for (data, method), seeds in per_seed.items():
    rows.append(
      {
        "dataset": data,
        "method": method,
        "n": len(seeds),
        "seeds": sorted(seeds),
        **report.mean_diagnostics(list(seeds.values())),
      }
    )
  if not rows:
    return "", []
  report.write_csv(
    os.path.join(workdir, "weights.csv"),
    rows,
    ["dataset", "method", "n", *report.WEIGHT_DIAGNOSTICS, "seeds"],
  )
  text = (
    "\nThe importance weights, per seed averaged over fine-tuning, then over seeds: effective"
    " sample size as a fraction of the batch, largest weight, fraction clipped, mean log"
    " q/π_ref\n\n"
    f"{report.weights_table(rows)}\n"
  )
  return text, ["weights.csv"]
