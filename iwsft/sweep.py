"""One grid runner for both pipelines: methods × datasets × seeds, resumable cells, tables, figures.

A pipeline's grid says what its cells are and how to run a group of them; `run_sweep` does the rest
the same way for both: claim the workdir, plan (finished cells are skipped), run the groups, then
summarise every cell's score into table.md / table.csv / cells.csv, with what the importance
weights change per seed (paired.csv) and the weights' diagnostics (weights.csv), and draw the
figures.

Control layout under the sweep's workdir:
  <dataset>/reference_<seeds>/            π_ref of those seeds, shared by every method on the
  dataset
  <dataset>/<method>/group_<seeds>/       one run_control_seeds run: run.json, stacked checkpoints
  <dataset>/<method>/group_<seeds>/seed_<s>/result.json, metrics.jsonl, curve.png, policy/  a cell
(<dataset> is the Minari id with "/" as "__"; <seeds> like 0-1-2.) The seeds of a group train
together in one vmapped program. Language: one run_lm per seed in seed_<s>/ (not vmapped: each
seed samples its own curated data); its records are pass@1 greedy and sampled, as two "datasets".
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Sequence

from iwsft.errors import UserError
from iwsft.io import plots, report
from iwsft.io import workdir as workdir_lib


def _seeds_name(prefix: str, seeds) -> str:
  return f"{prefix}_{'-'.join(map(str, seeds))}"


class ControlGrid:
  """Control cells: (dataset, method, seed); groups: (dataset, method, seeds trained together)."""

  score_label = "normalised score ×100"

  def __init__(
    self,
    cfg,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    seeds_per_group: int,
    build: tuple[str, str, list[str]] | None = None,
    configs: dict | None = None,
  ):
    from iwsft.control.config import METHODS, UNWEIGHTED

    self.pairs = UNWEIGHTED
    bad = [m for m in methods if m not in METHODS]
    if bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    self.cfg, self.methods, self.datasets, self.seeds = cfg, list(methods), list(datasets), seeds
    self.seeds_per_group, self.build = seeds_per_group, build
    # datasets with a config file of their own (configs/control/): their cells use it, not cfg
    self.configs = dict(configs or {})
    self.datasets += [d for d in self.configs if d not in self.datasets]

  @staticmethod
  def slug(dataset: str) -> str:
    return dataset.replace("/", "__")

  @staticmethod
  def training_data(dataset: str) -> str:
    """What a record's cell trained on (its weights' diagnostics are of that)."""
    return dataset

  def identity(self) -> dict:
    identity = self._settings(self.cfg)
    if self.configs:
      identity["dataset_configs"] = {d: self._settings(c) for d, c in self.configs.items()}
    return identity

  @staticmethod
  def _settings(cfg) -> dict:
    return workdir_lib.result_settings(cfg, "dataset", "method", "seed")

  def cells(self, workdir: str, dataset: str, method: str) -> dict[int, tuple[str, dict]]:
    """Finished cells of (dataset, method): {seed: (cell directory, result)}."""
    out = {}
    pattern = os.path.join(workdir, self.slug(dataset), method, "group_*", "seed_*", "result.json")
    for path in sorted(glob.glob(pattern)):
      with open(path) as f:
        result = json.load(f)
      out[int(result["seed"])] = (os.path.dirname(path), result)
    return out

  def plan(self, workdir: str) -> list[tuple[str, str, list[int]]]:
    todo = []
    for dataset in self.datasets:
      for method in self.methods:
        done = self.cells(workdir, dataset, method)
        rest = [s for s in self.seeds if s not in done]
        size = self.seeds_per_group if self.seeds_per_group > 0 else max(1, len(rest))
        todo += [(dataset, method, rest[i : i + size]) for i in range(0, len(rest), size)]
    return todo

  def describe(self, group) -> str:
    dataset, method, seeds = group
    return f"{method} on {dataset}, seeds {','.join(map(str, seeds))}"

  def validate(self) -> None:
    """Every cell's settings, checked before the workdir is touched."""
    from iwsft.control.pipeline import validate

    for dataset in self.datasets:
      for method in self.methods:
        validate(self._cell_config(dataset, method))

  def _cell_config(self, dataset: str, method: str):
    cfg = self.configs.get(dataset, self.cfg).copy_and_resolve_references()
    cfg.update(dataset=dataset, method=method)
    cfg.log = self.cfg.log.copy_and_resolve_references()
    return cfg

  def prepare(self) -> None:
    if self.build is not None:
      from iwsft.control import datasets

      datasets.build(*self.build, seed=0, force=False)

  def run(self, group, workdir: str) -> None:
    from iwsft.control.pipeline import run_control_seeds

    dataset, method, seeds = group
    cfg = self._cell_config(dataset, method)
    base = os.path.join(workdir, self.slug(dataset))
    run_control_seeds(
      cfg,
      seeds,
      os.path.join(base, method, _seeds_name("group", seeds)),
      reference_dir=os.path.join(base, _seeds_name("reference", seeds)),
      quiet=True,
    )

  def records(self, workdir: str) -> list[dict]:
    """One record per finished cell: normalised score (raw return without reference scores)."""
    out = []
    for dataset in self.datasets:
      for method in self.methods:
        done = self.cells(workdir, dataset, method)
        for s in (s for s in self.seeds if s in done):
          cell, r = done[s]
          score = r["normalised_score"] if r["normalised_score"] is not None else r["return_mean"]
          out.append(
            {
              "dataset": dataset,
              "method": method,
              "seed": s,
              "score": score,
              "return_mean": r["return_mean"],
              "wall_time_s": r["wall_time_s"],
              "seeds_trained_together": r.get("seeds_trained_together", 1),
              "cell": cell,
            }
          )
    return out

  def figures(self, recs: list[dict], workdir: str) -> list[str]:
    """curves.png (evaluation during training) and bounds.png (SFT vs iw-SFT bound estimates)."""
    short = {d: d.split("/", 1)[-1] for d in self.datasets}
    made = []
    for name, panels, x, y, title in (
      (
        "curves.png",
        _curves(recs, "eval"),
        "update step of the method's stage",
        self.score_label,
        f"evaluation during training, mean and 95% CI over {len(self.seeds)} seeds "
        "(bc: the π_ref stage; the others start from π_ref)",
      ),
      (
        "bounds.png",
        _curves(recs, "bound"),
        "update step",
        "bound estimate (per step)",
        "SFT vs iw-SFT lower-bound estimates while training iw-SFT (mean, 95% CI)",
      ),
    ):
      if panels:
        plots.band_panels(
          {short[d]: panels[d] for d in self.datasets if d in panels},
          os.path.join(workdir, name),
          x,
          y,
          title,
        )
        made.append(name)
    return made


def _curves(recs: list[dict], kind: str) -> dict[str, dict[str, tuple]]:
  """Per dataset, per series, (steps, mean, CI) over seeds. kind "eval": each method's evaluation
  score over its stage (bc is π_ref, so its curve is the reference stage's); "bound": the SFT and
  iw-SFT bound estimates logged while training iw_sft."""
  panels: dict[str, dict[str, list]] = {}
  for r in recs:
    rows = workdir_lib.read_rows(os.path.join(r["cell"], "metrics.jsonl"))
    if kind == "eval":
      stage = "reference" if r["method"] == "bc" else r["method"]
      ev = [row for row in rows if row["kind"] == "eval" and row["stage"] == stage]
      key = (
        "normalised_score" if ev and ev[0].get("normalised_score") is not None else "return_mean"
      )
      series = {r["method"]: ev and ([row["step"] for row in ev], [row[key] for row in ev])}
    elif r["method"] == "iw_sft":
      tr = [row for row in rows if row["kind"] == "train" and row["stage"] == "iw_sft"]
      series = {
        label: tr and name in tr[0] and ([row["step"] for row in tr], [row[name] for row in tr])
        for name, label in (("bound/sft", "SFT bound"), ("bound/iw_sft", "iw-SFT bound"))
      }
    else:
      series = {}
    for label, curve in series.items():
      if curve:
        panels.setdefault(r["dataset"], {}).setdefault(label, []).append(curve)
  return {d: {k: report.curve_band(c) for k, c in s.items()} for d, s in panels.items()}


class LMGrid:
  """Language cells: (metric, model, seed); groups: one seed (all its stages)."""

  score_label = "pass@1 ×100"

  def __init__(self, cfg, methods: Sequence[str], seeds: Sequence[int]):
    from iwsft.lm.config import LM_METHODS, UNWEIGHTED

    self.pairs = UNWEIGHTED
    bad = [m for m in methods if m not in LM_METHODS]
    if bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(LM_METHODS)}")
    self.cfg = cfg.copy_and_resolve_references()
    if methods:
      self.cfg.methods = tuple(methods)
    from iwsft.lm.task import make_task

    self.methods, self.seeds = ["base", *self.cfg.methods], seeds
    self.task = make_task(self.cfg.task).name
    self.datasets = [f"{self.task} pass@1 ({mode})" for mode in ("greedy", "sampled")]

  def training_data(self, dataset: str) -> str:
    """Both pass@1 "datasets" evaluate one training run per seed, on the task's curated samples."""
    return self.task

  def identity(self) -> dict:
    return workdir_lib.result_settings(self.cfg, "seed", "stages")

  def _result(self, workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed_{seed}", "result.json")

  def plan(self, workdir: str) -> list[int]:
    return [s for s in self.seeds if not os.path.exists(self._result(workdir, s))]

  def describe(self, seed) -> str:
    return f"language pipeline, seed {seed}"

  def validate(self) -> None:
    """The run's settings (without loading a model), checked before the workdir is touched."""
    from iwsft.lm.pipeline import check_settings

    check_settings(self.cfg)

  def prepare(self) -> None:
    pass

  def run(self, seed, workdir: str) -> None:
    from iwsft.lm.pipeline import run_lm

    cfg = self.cfg.copy_and_resolve_references()
    cfg.seed = seed
    run_lm(cfg, os.path.join(workdir, f"seed_{seed}"), quiet=True)

  def records(self, workdir: str) -> list[dict]:
    out = []
    for seed in (s for s in self.seeds if os.path.exists(self._result(workdir, s))):
      with open(self._result(workdir, seed)) as f:
        result = json.load(f)
      for mode, dataset in zip(("greedy", "sampled"), self.datasets):
        for model, r in result["models"].items():
          out.append(
            {
              "dataset": dataset,
              "method": model,
              "seed": seed,
              "score": 100.0 * r[f"pass@1_{mode}"],
              "cell": os.path.join(workdir, f"seed_{seed}"),
            }
          )
    return out

  def figures(self, recs: list[dict], workdir: str) -> list[str]:
    """weights.png: the importance-weight diagnostics of each weighted method over fine-tuning."""
    panels: dict[str, dict[str, list]] = {}
    for seed in {r["seed"] for r in recs}:
      rows = workdir_lib.read_rows(os.path.join(workdir, f"seed_{seed}", "metrics.jsonl"))
      for method in ("iw_sft", "iw_sft_step"):
        tr = [row for row in rows if row["kind"] == "train" and row["stage"] == method]
        for key in ("iw/ess_fraction", "iw/clip_fraction", "iw/mean_log_ratio", "iw/mean_weight"):
          if tr and key in tr[0]:
            curve = ([row["step"] for row in tr], [row[key] for row in tr])
            panels.setdefault(key, {}).setdefault(method, []).append(curve)
    if not panels:
      return []
    bands = {k: {m: report.curve_band(c) for m, c in s.items()} for k, s in panels.items()}
    plots.band_panels(
      bands,
      os.path.join(workdir, "weights.png"),
      "fine-tuning step",
      "value",
      f"importance-weight diagnostics, mean and 95% CI over {len(self.seeds)} seeds",
    )
    return ["weights.png"]


CELL_COLUMNS = [
  "dataset",
  "method",
  "seed",
  "score",
  "return_mean",
  "wall_time_s",
  "seeds_trained_together",
  "cell",
]


PAIRED_COLUMNS = [
  "dataset",
  "method",
  "baseline",
  "n",
  "mean",
  "std",
  "ci_low",
  "ci_high",
  "above",
  "below",
  "seeds",
  "per_seed",
]


def run_sweep(
  grid,
  workdir: str,
  overwrite: bool = False,
  dry_run: bool = False,
  bootstrap_seed: int = 0,
  header: str = "",
  say=print,
) -> dict:
  """Runs what is left of a grid in workdir, then writes its tables and figures; returns
  sweep.json."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  grid.validate()
  identity = {"pipeline": grid.cfg.pipeline, "config": grid.identity()}
  if dry_run:
    changed = workdir_lib.settings_difference(workdir, identity)
    if changed:
      say(f"{workdir} holds a sweep with other settings ({changed}): --overwrite reruns every cell")
      return {}
    todo = grid.plan(workdir)
    say(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
    say("\n".join(grid.describe(g) for g in todo))
    return {}
  _claim(workdir, identity, overwrite)
  if not grid.cfg.log.wandb_group:  # the sweep's runs as one group in W&B
    grid.cfg.log.wandb_group = os.path.basename(workdir)
  todo = grid.plan(workdir)  # after any removal by _claim
  say(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
  grid.prepare()
  for i, group in enumerate(todo):
    say(f"[{i + 1}/{len(todo)}] {grid.describe(group)}")
    grid.run(group, workdir)
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


def _claim(workdir: str, identity: dict, overwrite: bool) -> None:
  """Records the sweep's settings; with overwrite, removes cells made with other settings."""
  _, changed = workdir_lib.claim_workdir(workdir, identity, overwrite, marker="")
  if changed:  # only with overwrite
    for name in os.listdir(workdir):
      if name != "run.json":
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _write_tables(grid, recs, workdir: str, bootstrap_seed: int, header: str, say) -> list[str]:
  summary = report.summarise(recs, seed=bootstrap_seed)
  table = report.markdown_table(summary, grid.methods, grid.datasets)
  seeds = ",".join(map(str, grid.seeds))
  text = (
    f"{grid.score_label}: mean ± std [95% bootstrap CI] over seeds {seeds}"
    f"{' (' + header + ')' if header else ''}\n\n{table}\n"
  )
  paired_text, paired_outputs = _write_paired(grid, recs, workdir, bootstrap_seed)
  weights_text, weights_outputs = _write_weights(grid, recs, workdir)
  text += paired_text + weights_text
  outputs = ["table.md", "table.csv", "cells.csv", *paired_outputs, *weights_outputs]
  say("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  report.write_csv(
    os.path.join(workdir, "table.csv"),
    summary,
    ["dataset", "method", "n", "mean", "std", "ci_low", "ci_high", "seeds"],
  )
  cells = [dict(r, cell=os.path.relpath(r["cell"], workdir)) for r in recs]  # movable with it
  report.write_csv(os.path.join(workdir, "cells.csv"), cells, CELL_COLUMNS)
  return outputs


def _write_paired(grid, recs, workdir: str, bootstrap_seed: int) -> tuple[str, list[str]]:
  """What the importance weights change (report.paired_differences over grid.pairs): a section
  of table.md (returned), paired.csv and paired.png; nothing when no pair is in the grid."""
  paired = report.paired_differences(recs, grid.pairs, seed=bootstrap_seed)
  if not paired:
    return "", []
  report.write_csv(os.path.join(workdir, "paired.csv"), paired, PAIRED_COLUMNS)
  plots.paired_differences(
    paired,
    os.path.join(workdir, "paired.png"),
    f"difference in {grid.score_label}",
    "what the importance weights change, per seed; mean and 95% CI over seeds "
    + ",".join(map(str, grid.seeds)),
    label=lambda d: d.split("/", 1)[-1],
  )
  text = (
    "\nWhat the importance weights change: each weighted method minus the same method with every"
    " weight 1, per seed (same π_ref, same random stream); mean [95% bootstrap CI] of the paired"
    " differences, and on how many seeds the weighted method scored higher or lower\n\n"
    f"{report.paired_table(paired, grid.datasets)}\n"
  )
  return text, ["paired.csv", "paired.png"]


def _write_weights(grid, recs, workdir: str) -> tuple[str, list[str]]:
  """The weights' diagnostics of every weighted method (grid.pairs): per seed averaged over
  fine-tuning, then over seeds; a section of table.md (returned) and weights.csv."""
  per_seed: dict[tuple[str, str], dict[int, dict]] = {}
  for r in recs:
    if r["method"] in grid.pairs:
      cell = per_seed.setdefault((grid.training_data(r["dataset"]), r["method"]), {})
      if r["seed"] not in cell:
        rows = workdir_lib.read_rows(os.path.join(r["cell"], "metrics.jsonl"))
        cell[r["seed"]] = report.weight_diagnostics(rows, r["method"])
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
  body = [[r["dataset"], r["method"], r["n"], *report.diagnostics_text(r)] for r in rows]
  text = (
    "\nThe importance weights, per seed averaged over fine-tuning, then over seeds: effective"
    " sample size as a fraction of the batch, largest weight, fraction clipped, mean log"
    " q/π_ref\n\n"
    f"{report.format_table(['dataset', 'method', 'seeds', *report.DIAGNOSTICS_HEADER], body)}\n"
  )
  return text, ["weights.csv"]
