"""The language pipeline's grid for the sweep engine (iwsft/sweep.py): one run_lm per seed in
seed_<s>/ (not vmapped: each seed samples its own curated data); its records are pass@1 greedy and
sampled, as two "datasets"."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from iwsft.core.config import with_overrides
from iwsft.errors import UserError
from iwsft.io import plots, report
from iwsft.io import workdir as workdir_lib
from iwsft.lm.config import LM_METHODS, UNWEIGHTED, get_config
from iwsft.lm.pipeline import run_lm
from iwsft.lm.settings import check_settings, run_identity
from iwsft.lm.task import make_task
from iwsft.sweep import CellRecord

# the weights' diagnostics drawn over fine-tuning (weights.png)
IW_KEYS = ("iw/ess_fraction", "iw/clip_fraction", "iw/mean_log_ratio", "iw/mean_weight")


class LMGrid:
  """Language cells: (metric, model, seed); groups: one seed (all its stages)."""

  score_label = "pass@1 ×100"
  across_datasets = False  # its two "datasets" are two readings (greedy, sampled) of one run

  def __init__(self, cfg, methods: Sequence[str], seeds: Sequence[int]):
    self.pairs, self.controls = UNWEIGHTED, {}
    bad = [m for m in methods if m not in LM_METHODS]
    if bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(LM_METHODS)}")
    self.cfg = cfg.copy_and_resolve_references()
    if methods:
      self.cfg.methods = tuple(methods)
    self.methods, self.seeds = ["reference", *self.cfg.methods], seeds
    self.task = make_task(self.cfg.task).name
    self.datasets = [f"{self.task} pass@1 ({mode})" for mode in ("greedy", "sampled")]

  def training_data(self, dataset: str) -> str:
    """Both pass@1 "datasets" evaluate one training run per seed, on the task's curated samples."""
    return self.task

  def identity(self) -> dict:
    return {**workdir_lib.result_settings(self.cfg, "seed", "stages"), **run_identity()}

  @staticmethod
  def defaults() -> dict:
    """The identity of the default settings (claim_workdir's defaults)."""
    return workdir_lib.result_settings(get_config(), "seed", "stages")

  def _result(self, workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed_{seed}", "result.json")

  def plan(self, workdir: str) -> list[int]:
    return [s for s in self.seeds if not os.path.exists(self._result(workdir, s))]

  @staticmethod
  def stage(name: str) -> str:
    """The stage whose rows hold a model's training: its method's name."""
    return name

  def keys(self) -> list[int]:
    """What must run in one process: a seed (its methods share one sampled pool)."""
    return list(self.seeds)

  def key(self, seed) -> int:
    return seed

  def describe(self, seed) -> str:
    return f"language pipeline, seed {seed}"

  def validate(self) -> None:
    """The run's settings (without loading a model), checked before the workdir is touched."""
    check_settings(self.cfg)

  def prepare(self) -> None:
    pass

  def run(self, seed, workdir: str) -> None:
    cfg = with_overrides(self.cfg, {"seed": seed})
    run_lm(cfg, os.path.join(workdir, f"seed_{seed}"), quiet=True)

  def records(self, workdir: str) -> list[CellRecord]:
    """Per finished seed, per model, per pass@1 mode: its score, its per-problem outcomes, and
    (for weighted methods) the weights' diagnostics and their curves over its fine-tuning."""
    out = []
    for seed in (s for s in self.seeds if os.path.exists(self._result(workdir, s))):
      cell = os.path.join(workdir, f"seed_{seed}")
      with open(self._result(workdir, seed)) as f:
        models = json.load(f)["models"]
      rows = workdir_lib.read_rows(os.path.join(cell, "metrics.jsonl"))
      for model, r in models.items():
        weighted = model in self.pairs
        tr = [row for row in rows if row["kind"] == "train" and row["stage"] == model]
        keys = [k for k in IW_KEYS if weighted and tr and k in tr[0]]
        curves = {k: ([t["step"] for t in tr], [t[k] for t in tr]) for k in keys}
        weights = report.weight_diagnostics(rows, model) if weighted else None
        for mode, dataset in zip(("greedy", "sampled"), self.datasets):
          out.append(
            CellRecord(
              dataset=dataset,
              method=model,
              seed=seed,
              score=100.0 * r[f"pass@1_{mode}"],
              cell=cell,
              weights=weights,
              curves=curves,
              outcomes=r.get(f"correct_{mode}"),
            )
          )
    return out

  def extra_tables(self, recs: list[CellRecord], workdir: str) -> tuple[str, list[str]]:
    """Each weighted method against its unweighted counterpart paired by problem, over every
    seed's held-out problems (report.problem_pairs: McNemar's test and a Wald interval of the
    pass@1 difference): a section of table.md and problems.csv."""
    mode_of = dict(zip(self.datasets, ("greedy", "sampled")))
    outcomes = {
      (r.seed, r.method, mode_of[r.dataset]): np.array(r.outcomes)
      for r in recs
      if r.outcomes is not None
    }
    rows = report.problem_pairs(
      outcomes, {m: b for m, b in self.pairs.items() if m in self.methods}
    )
    if not rows:
      return "", []
    report.write_csv(os.path.join(workdir, "problems.csv"), rows, report.PROBLEM_COLUMNS)
    return report.problem_pairs_text(rows), ["problems.csv"]

  def figures(self, recs: list[CellRecord], workdir: str) -> list[str]:
    """weights.png: the importance-weight diagnostics of each weighted method over fine-tuning."""
    panels: dict[str, dict[str, list]] = {}
    for r in recs:
      if r.dataset == self.datasets[0]:  # one training run behind both pass@1 modes
        for key, curve in r.curves.items():
          panels.setdefault(key, {}).setdefault(r.method, []).append(curve)
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
