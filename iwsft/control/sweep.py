"""A control sweep: methods × datasets × seeds, with the seeds of a cell group trained together.

Layout under the sweep's workdir:
  <dataset>/reference_<seeds>/            π_ref of those seeds, shared by every method on the dataset
  <dataset>/<method>/group_<seeds>/       one run_control_seeds run: run.json, stacked checkpoints
  <dataset>/<method>/group_<seeds>/seed_<s>/result.json, metrics.jsonl, curve.png, policy/  one cell
(<dataset> is the Minari id with "/" as "__"; <seeds> like 0-1-2.) A cell with a result.json is
finished and never rerun; an unfinished group resumes from its checkpoints when the sweep is rerun.
"""

from __future__ import annotations

import glob
import json
import os

from iwsft import aggregate
from iwsft.control.run import run_control_seeds

SCORE = "normalised score ×100"


def slug(dataset: str) -> str:
  return dataset.replace("/", "__")


def _group_name(prefix: str, seeds) -> str:
  return f"{prefix}_{'-'.join(map(str, seeds))}"


def cell_results(workdir: str, dataset: str, method: str) -> dict[int, tuple[str, dict]]:
  """Finished cells of (dataset, method): {seed: (cell directory, result)}."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, slug(dataset), method, "group_*", "seed_*", "result.json"))):
    with open(path) as f:
      result = json.load(f)
    out[int(result["seed"])] = (os.path.dirname(path), result)
  return out


def plan(workdir: str, datasets, methods, seeds, seeds_per_group: int) -> list[tuple[str, str, list[int]]]:
  """The groups still to run: (dataset, method, seeds), finished cells left out, seeds chunked."""
  todo = []
  for dataset in datasets:
    for method in methods:
      done = cell_results(workdir, dataset, method)
      rest = [s for s in seeds if s not in done]
      size = seeds_per_group if seeds_per_group > 0 else max(1, len(rest))
      todo += [(dataset, method, rest[i:i + size]) for i in range(0, len(rest), size)]
  return todo


def run_grid(base_cfg, workdir: str, groups, quiet: bool = False, progress=print) -> None:
  """Runs the groups of `plan` (base_cfg with method/dataset set per group)."""
  for i, (dataset, method, group) in enumerate(groups):
    progress(f"[{i + 1}/{len(groups)}] {method} on {dataset}, seeds {','.join(map(str, group))}")
    cfg = base_cfg.copy_and_resolve_references()
    cfg.update(dataset=dataset, method=method)
    run_control_seeds(cfg, group, os.path.join(workdir, slug(dataset), method, _group_name("group", group)),
                      reference_dir=os.path.join(workdir, slug(dataset), _group_name("reference", group)),
                      quiet=quiet)


def records(workdir: str, datasets, methods, seeds) -> list[dict]:
  """One record per finished cell of the grid: normalised score (raw return without reference scores)."""
  out = []
  for dataset in datasets:
    for method in methods:
      done = cell_results(workdir, dataset, method)
      for s in seeds:
        if s in done:
          cell, r = done[s]
          score = r["normalised_score"] if r["normalised_score"] is not None else r["return_mean"]
          out.append({"dataset": dataset, "method": method, "seed": s, "score": score,
                      "return_mean": r["return_mean"], "wall_time_s": r["wall_time_s"],
                      "seeds_trained_together": r.get("seeds_trained_together", 1), "cell": cell})
  return out


def _rows(cell: str) -> list[dict]:
  from iwsft.cli import read_rows

  return read_rows(os.path.join(cell, "metrics.jsonl"))


def learning_curves(recs: list[dict]) -> dict[str, dict[str, tuple]]:
  """Per dataset, per fine-tuning method: evaluation score over its stage's updates (mean, 95% CI
  over seeds). bc is π_ref itself, so its curve is the reference stage's."""
  panels: dict[str, dict[str, list]] = {}
  for r in recs:
    stage = "reference" if r["method"] == "bc" else r["method"]
    ev = [row for row in _rows(r["cell"]) if row["kind"] == "eval" and row["stage"] == stage]
    key = "normalised_score" if ev and ev[0].get("normalised_score") is not None else "return_mean"
    if ev:
      panels.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(
          ([row["step"] for row in ev], [row[key] for row in ev]))
  return {d: {m: aggregate.curve_band(c) for m, c in ms.items()} for d, ms in panels.items()}


def bound_curves(recs: list[dict], method: str = "iw_sft") -> dict[str, dict[str, tuple]]:
  """Per dataset: the SFT and iw-SFT bound estimates logged while training `method` (mean, 95% CI)."""
  panels: dict[str, dict[str, list]] = {}
  for r in recs:
    if r["method"] != method:
      continue
    tr = [row for row in _rows(r["cell"]) if row["kind"] == "train" and row["stage"] == method]
    for name, label in (("bound/sft", "SFT bound"), ("bound/iw_sft", "iw-SFT bound")):
      if tr and name in tr[0]:
        panels.setdefault(r["dataset"], {}).setdefault(label, []).append(
            ([row["step"] for row in tr], [row[name] for row in tr]))
  return {d: {k: aggregate.curve_band(c) for k, c in s.items()} for d, s in panels.items()}
