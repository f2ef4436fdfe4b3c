"""The control pipeline's grid for the sweep engine (iwsft/sweep.py): cells (dataset, variant,
seed), groups (dataset, variant, seeds trained together in one vmapped program). A variant is a
method with config overrides (a sweep's variants are the methods themselves; an ablation's move one
setting each, experiments/ablations.py).

Layout under the sweep's workdir:
  <dataset>/reference_<seeds>/            π_ref of those seeds, shared by the dataset's variants
  <dataset>/<variant>/group_<seeds>/      one run_control_seeds run: run.json, stacked checkpoints
  <dataset>/<variant>/group_<seeds>/seed_<s>/result.json, metrics.jsonl, curve.png, policy/  a cell
(<dataset> is the Minari id with "/" as "__", <variant> the name with other signs as "_"; <seeds>
like 0-1-2.)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence

from iwsft import datasets
from iwsft.control.config import CONTROLS, METHODS, UNWEIGHTED, WEIGHTED, get_config
from iwsft.control.pipeline import run_control_seeds
from iwsft.control.settings import validate
from iwsft.core.config import with_overrides
from iwsft.errors import UserError
from iwsft.io import plots, report
from iwsft.io import workdir as workdir_lib
from iwsft.sweep import CellRecord


def _seeds_name(prefix: str, seeds) -> str:
  return f"{prefix}_{'-'.join(map(str, seeds))}"


@dataclasses.dataclass(frozen=True)
class Variant:
  """A column of a control grid: `method` trained with config `overrides` ({dotted key: value});
  `baseline` names the variant it is paired with seed by seed ("" for none), `ablates` the
  setting it moves (for an ablation's table)."""

  method: str
  overrides: Mapping = dataclasses.field(default_factory=dict)
  baseline: str = ""
  ablates: str = ""


def slug(name: str) -> str:
  """A dataset id or variant name as a directory name."""
  name = name.replace("/", "__")
  return "".join(c if c.isalnum() or c in "=._-" else "_" for c in name).strip("_")


class ControlGrid:
  """Control cells: (dataset, variant, seed); groups: (dataset, variant, seeds trained together).

  methods: method names (each a variant of itself, paired as config.UNWEIGHTED and
  config.CONTROLS pair them) or {name: Variant} (paired by their baselines)."""

  score_label = "normalised score ×100"
  across_datasets = True

  def __init__(
    self,
    cfg,
    methods: Sequence[str] | Mapping[str, Variant],
    datasets: Sequence[str],
    seeds: Sequence[int],
    seeds_per_group: int,
    build: tuple[str, str, list[str]] | None = None,
    configs: dict | None = None,
  ):
    if isinstance(methods, Mapping):
      self.variants = dict(methods)
      self.pairs = {n: v.baseline for n, v in self.variants.items() if v.baseline}
      self.controls = {}
    else:
      self.variants = {m: Variant(m) for m in methods}
      self.pairs, self.controls = UNWEIGHTED, CONTROLS
    bad = [v.method for v in self.variants.values() if v.method not in METHODS]
    if bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    self.cfg, self.datasets, self.seeds = cfg, list(datasets), seeds
    self.methods = list(self.variants)
    self.seeds_per_group, self.build = seeds_per_group, build
    # datasets with a config file of their own (configs/control/): their cells use it, not cfg
    self.configs = dict(configs or {})
    self.datasets += [d for d in self.configs if d not in self.datasets]

  def stage(self, name: str) -> str:
    """The training stage whose rows hold a variant's own training ("reference" for bc)."""
    method = self.variants[name].method
    return "reference" if method == "bc" else method

  @staticmethod
  def training_data(dataset: str) -> str:
    """What a record's cell trained on (its weights' diagnostics are of that)."""
    return dataset

  def identity(self) -> dict:
    identity = self._settings(self.cfg)
    if any(v != Variant(n) for n, v in self.variants.items()):
      identity["variants"] = {
        n: {"method": v.method, "overrides": dict(v.overrides)} for n, v in self.variants.items()
      }
    if self.configs:
      identity["dataset_configs"] = {d: self._settings(c) for d, c in self.configs.items()}
    return identity

  def defaults(self) -> dict:
    """The identity of the default settings (claim_workdir's defaults)."""
    return self._settings(get_config())

  @staticmethod
  def _settings(cfg) -> dict:
    return workdir_lib.result_settings(cfg, "dataset", "method", "seed")

  def cells(self, workdir: str, dataset: str, method: str) -> dict[int, tuple[str, dict]]:
    """Finished cells of (dataset, method): {seed: (cell directory, result)}."""
    out = {}
    pattern = os.path.join(workdir, slug(dataset), slug(method), "group_*", "seed_*", "result.json")
    for path in sorted(glob.glob(pattern)):
      with open(path) as f:
        result = json.load(f)
      out[int(result["seed"])] = (os.path.dirname(path), result)
    return out

  def _chunks(self) -> list[tuple[int, ...]]:
    """The seeds in groups of seeds_per_group (all together for 0), in order."""
    size = self.seeds_per_group if self.seeds_per_group > 0 else len(self.seeds)
    return [tuple(self.seeds[i : i + size]) for i in range(0, len(self.seeds), size)]

  def plan(self, workdir: str) -> list[tuple[str, str, list[int]]]:
    """The groups left to run: each chunk of seeds' unfinished ones, per dataset and method."""
    todo = []
    for dataset in self.datasets:
      for method in self.methods:
        done = self.cells(workdir, dataset, method)
        for chunk in self._chunks():
          rest = [s for s in chunk if s not in done]
          if rest:
            todo.append((dataset, method, rest))
    return todo

  def keys(self) -> list[tuple]:
    """What must run in one process: a dataset's chunk of seeds (its methods share π_ref)."""
    return [(dataset, chunk) for dataset in self.datasets for chunk in self._chunks()]

  def key(self, group) -> tuple:
    dataset, _, seeds = group
    return next(k for k in self.keys() if k[0] == dataset and seeds[0] in k[1])

  def describe(self, group) -> str:
    dataset, method, seeds = group
    return f"{method} on {dataset}, seeds {','.join(map(str, seeds))}"

  def validate(self) -> None:
    """Every cell's settings, checked before the workdir is touched."""
    for dataset in self.datasets:
      for method in self.methods:
        validate(self._cell_config(dataset, method))

  def _cell_config(self, dataset: str, name: str):
    v = self.variants[name]
    cfg = with_overrides(
      self.configs.get(dataset, self.cfg),
      {"dataset": dataset, "method": v.method, **v.overrides},
    )
    cfg.log = self.cfg.log.copy_and_resolve_references()  # the sweep's logging for every cell
    return cfg

  def extra_tables(self, recs: list[CellRecord], workdir: str) -> tuple[str, list[str]]:
    """No tables beyond the engine's for control cells."""
    return "", []

  def prepare(self) -> None:
    if self.build is not None:
      datasets.build(*self.build, seed=0, force=False)

  def run(self, group, workdir: str) -> None:
    dataset, name, seeds = group
    cfg = self._cell_config(dataset, name)
    base = os.path.join(workdir, slug(dataset))
    run_control_seeds(
      cfg,
      seeds,
      os.path.join(base, slug(name), _seeds_name("group", seeds)),
      reference_dir=os.path.join(base, _seeds_name("reference", seeds)),
      quiet=True,
    )

  def records(self, workdir: str) -> list[CellRecord]:
    """One record per finished cell: normalised score (raw return without reference scores),
    the weights' diagnostics and the curves of its own training (from its metrics.jsonl)."""
    out = []
    for dataset in self.datasets:
      for name in self.methods:
        done = self.cells(workdir, dataset, name)
        for s in (s for s in self.seeds if s in done):
          out.append(self._record(dataset, name, s, *done[s]))
    return out

  def _record(self, dataset: str, name: str, seed: int, cell: str, result: dict) -> CellRecord:
    score = result["normalised_score"]
    rows = workdir_lib.read_rows(os.path.join(cell, "metrics.jsonl"))
    stage = self.stage(name)
    weighted = self.variants[name].method in WEIGHTED
    return CellRecord(
      dataset=dataset,
      method=name,
      seed=seed,
      score=score if score is not None else result["return_mean"],
      cell=cell,
      return_mean=result["return_mean"],
      wall_time_s=result["wall_time_s"],
      seeds_trained_together=result.get("seeds_trained_together", 1),
      weights=_weights(rows, stage, result) if weighted else None,
      divergence=(result.get("final_log_ratio") or {}).get("mean_log_ratio"),
      curves=_cell_curves(rows, stage),
    )

  def figures(self, recs: list[CellRecord], workdir: str) -> list[str]:
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


def _cell_curves(rows: list[dict], stage: str) -> dict[str, tuple[list, list]]:
  """A cell's series from its metrics rows: "eval", its evaluation score over its stage (the
  normalised score, else the return); where the stage logs them, "SFT bound" and "iw-SFT bound"."""
  ev = [row for row in rows if row["kind"] == "eval" and row["stage"] == stage]
  key = "normalised_score" if ev and ev[0].get("normalised_score") is not None else "return_mean"
  out = {"eval": ([row["step"] for row in ev], [row[key] for row in ev])} if ev else {}
  tr = [row for row in rows if row["kind"] == "train" and row["stage"] == stage]
  for name, label in (("bound/sft", "SFT bound"), ("bound/iw_sft", "iw-SFT bound")):
    if tr and name in tr[0]:
      out[label] = ([row["step"] for row in tr], [row[name] for row in tr])
  return out


def _curves(recs: list[CellRecord], kind: str) -> dict[str, dict[str, tuple]]:
  """Per dataset, per series, (steps, mean, CI) over seeds. kind "eval": each variant's evaluation
  score over its stage (bc is π_ref, so its curve is the reference stage's); "bound": the SFT and
  iw-SFT bound estimates logged while training iw_sft."""
  panels: dict[str, dict[str, list]] = {}
  for r in recs:
    if kind == "eval":
      series = {r.method: r.curves.get("eval")}
    elif r.method == "iw_sft":
      series = {label: r.curves.get(label) for label in ("SFT bound", "iw-SFT bound")}
    else:
      series = {}
    for label, curve in series.items():
      if curve:
        panels.setdefault(r.dataset, {}).setdefault(label, []).append(curve)
  return {d: {k: report.curve_band(c) for k, c in s.items()} for d, s in panels.items()}


def _weights(rows: list[dict], stage: str, result: dict) -> dict:
  """A weighted cell's diagnostics: averaged over its fine-tuning, and its final weights' order."""
  out = report.weight_diagnostics(rows, stage)
  final = result.get("final_log_ratio")
  if final is not None and final.get("spearman_log_ratio_return") is not None:
    out["final/spearman_log_ratio_return"] = final["spearman_log_ratio_return"]
  return out
