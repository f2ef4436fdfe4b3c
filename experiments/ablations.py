"""Ablations of iw-SFT on one mixed dataset: does importance weighting change the result over
filtered BC, and when?

  python experiments/ablations.py --workdir=runs/ablations [--dataset=ID] [--seeds=0,1,2,3,4]

Every variant is iw-SFT with one setting moved from the recipe (--config, default the `cpu`
preset), compared with filtered BC of the same fine-tuning length, which trains on the same curated
episodes from the same π_ref (--method=iw_sft_q: iw-SFT(Q) against SFT(Q), its unweighted
counterpart on the same quality-sampled episodes):
  temperature      1, 3, 10 (the recipe), 30
  q_decay          0 (q is the current policy, detached), 0.9 (the recipe), 0.99
  fine-tuning      the recipe's steps, and --long times as many (iw-SFT and filtered BC)
--family=curation asks instead whether importance weighting does more than sharper curation
would: the unweighted methods with their curation sharpened, each paired with its recipe, beside
the weighted methods at the recipe and π_ref trained on as long (bc_continued):
  filter           filtered BC on one --percentiles threshold (the recipe: 90/95/98 stratified)
  quality β        SFT(Q) at --betas, and sampling ∝ the normalised return (quality_mode=linear)
  batch            each method at a fine-tuning batch of --batch (weights self-normalised over
                   more episodes), the weighted ones paired with their unweighted counterpart
--family=length asks whether weighting matters more as θ moves away from π_ref: iw-SFT against
filtered BC and iw-SFT(Q) against SFT(Q) at --lengths times the recipe's fine-tuning steps, with
each run's final mean log θ/π_ref over the curated episodes (how far it moved), and the trend: each
seed's slope of the weights' gain on log10(length), averaged over seeds with a t-interval.
The variants are the columns of a control grid run by the sweep engine (iwsft/sweep.py: settings
validated before anything is written, finished cells skipped, unfinished ones resumed, --part /
--parts to split it over processes). All runs share one π_ref per seed (trained once) and train
their seeds together (vmapped). Per seed, a variant and filtered BC differ only in the weighting,
so the ablation table gives the paired difference (variant − filtered BC, per seed) with its 95%
Student-t CI next to each score, and the weights' diagnostics averaged over fine-tuning (effective
sample size as a fraction of the batch, largest weight, fraction clipped, mean log q/π_ref per
step). Writes to --workdir: table.md (the ablation table first, then the sweep engine's tables),
ablations.csv, ablations.png, length.png where a method ran at two lengths or more (score, paired
difference and log θ/π_ref at the end against the length), the engine's table.csv, cells.csv and
paired.csv, and the cells (iwsft/control/grid.py's layout).
"""

import os

import numpy as np
from absl import flags

from iwsft import sweep
from iwsft.control import config
from iwsft.control.grid import ControlGrid, Variant
from iwsft.io import cli, plots, report

BASELINE = config.UNWEIGHTED  # each weighted method and the method it is without the weights

cli.define_config(
  cli.config_file(config) + ":cpu",
  "the recipe: a control config file[:preset]; override values with --config.<key>=<value>",
)
flags.DEFINE_string("workdir", "runs/ablations", "output directory")
flags.DEFINE_string("dataset", "iwsft/hopper-small/medium-replay-v1", "a mixed dataset (Minari id)")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds, trained together")
flags.DEFINE_list("temperatures", ["1", "3", "10", "30"], "iw-SFT temperatures")
flags.DEFINE_list("q_decays", ["0", "0.9", "0.99"], "iw-SFT q decays")
flags.DEFINE_integer("long", 5, "the long fine-tuning is this many times the recipe's steps")
flags.DEFINE_enum("family", "weighting", ["weighting", "curation", "length"], "which ablations")
flags.DEFINE_list(
  "lengths", ["1", "2", "5", "10"], "length family: multiples of the recipe's steps"
)
flags.DEFINE_list("percentiles", ["95", "97.5", "99"], "curation family: filter thresholds")
flags.DEFINE_list("betas", ["0.05", "0.03", "0.02"], "curation family: SFT(Q) temperatures")
flags.DEFINE_integer("batch", 32, "curation family: the larger fine-tuning batch")
flags.DEFINE_enum(
  "method", "iw_sft", list(BASELINE), "the weighted method whose settings are ablated"
)
flags.DEFINE_integer("part", 0, "run only this part of the grid (see experiments/sweep.py)")
flags.DEFINE_integer("parts", 1, "split the grid into this many parts, one per process")
flags.DEFINE_bool("overwrite", False, "replace runs in --workdir made with other settings")


def variants(cfg, temperatures, q_decays, long: int, method: str = "iw_sft") -> dict:
  """{name: Variant} of every run, baselines first; every variant is `method` (iw_sft or
  iw_sft_q) with one setting moved, paired with BASELINE[method] at the same length."""
  steps = cfg.finetune.steps
  base_t, base_q = float(cfg.objective.temperature), float(cfg.objective.q_decay)
  base, base_long = BASELINE[method], f"{BASELINE[method]} x{long}"
  longer = {"finetune.steps": long * steps}
  warm = _warm(cfg)
  out = {
    "bc": Variant("bc", ablates="π_ref"),
    base: Variant(base, warm, ablates="baseline"),
    base_long: Variant(base, longer, ablates="baseline"),
    f"{method} (T={base_t:g}, q={base_q:g})": Variant(method, warm, base, "recipe"),
  }
  for t in temperatures:
    if t != base_t:
      out[f"{method} T={t:g}"] = Variant(
        method, {**warm, "objective.temperature": t}, base, "temperature"
      )
  for q in q_decays:
    if q != base_q:
      out[f"{method} q={q:g}"] = Variant(method, {**warm, "objective.q_decay": q}, base, "q_decay")
  out[f"{method} x{long}"] = Variant(method, longer, base_long, "fine-tuning length")
  return out


def _warm(cfg) -> dict:
  """A warm-up the recipe's length leaves room for (its own, or a tenth of the steps)."""
  steps = cfg.finetune.steps
  return {"finetune.warmup_steps": steps // 10} if cfg.finetune.warmup_steps >= steps else {}


def length_variants(cfg, lengths) -> dict:
  """{name: Variant}: the length family (module docstring), each weighted method and its
  unweighted counterpart at every multiple of the recipe's fine-tuning steps."""
  out, warm = {"bc": Variant("bc", ablates="π_ref")}, _warm(cfg)
  for k in lengths:
    tag, longer = (
      ("", warm) if k == 1 else (f" x{k:g}", {"finetune.steps": int(k * cfg.finetune.steps)})
    )
    for weighted, base in (("iw_sft", "filtered_bc"), ("iw_sft_q", "sft_q")):
      out[base + tag] = Variant(base, longer, ablates="baseline")
      out[weighted + tag] = Variant(weighted, longer, base + tag, "fine-tuning length")
  return out


def curation_variants(cfg, percentiles, betas, batch: int) -> dict:
  """{name: Variant}: the curation family (module docstring), baselines first."""
  warm, beta = _warm(cfg), float(cfg.curation.quality_beta)
  sft_q = f"sft_q beta={beta:g}"
  out = {
    "bc": Variant("bc", ablates="π_ref"),
    "bc_continued": Variant("bc_continued", warm, ablates="more training"),
    "filtered_bc": Variant("filtered_bc", warm, ablates="baseline"),
    sft_q: Variant("sft_q", warm, ablates="baseline"),
    "iw_sft": Variant("iw_sft", warm, "filtered_bc", "weighting"),
    f"iw_sft_q beta={beta:g}": Variant("iw_sft_q", warm, sft_q, "weighting"),
  }
  for p in percentiles:
    out[f"filtered_bc p{p:g}"] = Variant(
      "filtered_bc", {**warm, "curation.percentiles": (p,)}, "filtered_bc", "filter"
    )
  for b in betas:
    if b != beta:
      out[f"sft_q beta={b:g}"] = Variant(
        "sft_q", {**warm, "curation.quality_beta": b}, sft_q, "quality β"
      )
  out["sft_q linear"] = Variant(
    "sft_q", {**warm, "curation.quality_mode": "linear"}, sft_q, "quality β"
  )
  big = {**warm, "finetune.batch_size": batch}
  for m in ("filtered_bc", "sft_q", "iw_sft", "iw_sft_q"):
    base = f"{BASELINE[m]} b{batch}" if m in BASELINE else ""
    out[f"{m} b{batch}"] = Variant(m, big, base, "batch")
  return out


class AblationGrid(ControlGrid):
  """One dataset's variants; its extra table is the ablation table (ablations.csv, .png)."""

  def extra_tables(self, recs: list[sweep.CellRecord], workdir: str) -> tuple[str, list[str]]:
    rows = ablation_rows(self, recs)
    report.write_csv(
      os.path.join(workdir, "ablations.csv"),
      rows,
      ["run", "ablates", "length", "mean", "std", "ci_low", "ci_high", "per_seed", "baseline"]
      + ["diff", "diff_low", "diff_high", "divergence", "divergence_low", "divergence_high"]
      + list(report.WEIGHT_DIAGNOSTICS),
    )
    plots.score_bars(
      rows,
      os.path.join(workdir, "ablations.png"),
      "normalised score ×100",
      f"{self.datasets[0]}: ablations\nmean over seeds, 95% Student-t CI",
      name="run",
      points=[r["per_seed"] for r in rows],
    )
    bases = {v.baseline for v in self.variants.values() if v.baseline}
    text = (
      "\nThe ablations, each paired by seed with its baseline; weight diagnostics averaged over"
      f" fine-tuning\n\n{table(rows, bases.pop() if len(bases) == 1 else None)}\n"
    )
    outputs = ["ablations.csv", "ablations.png"]
    panels = length_panels(self, rows)
    if panels:
      plots.band_panels(
        panels,
        os.path.join(workdir, "length.png"),
        "fine-tuning updates (× the recipe's)",
        {"score": "normalised score ×100", PAIRED: "score difference"},
        f"{self.datasets[0]}: fine-tuning length\nmean over seeds, 95% Student-t CI",
        log_x=True,
      )
      outputs.append("length.png")
    trend = length_trend(self, rows)
    if trend:
      text += (
        "\nDoes the weights' gain grow with fine-tuning length? Each seed's least-squares slope of"
        " (weighted − unweighted) on log10 of the length, then their mean over seeds\n\n"
        f"{trend_table(trend)}\n"
      )
    return text, outputs


def ablation_rows(grid: ControlGrid, recs: list[sweep.CellRecord]) -> list[dict]:
  """One row per variant: its score's mean/std/CI, the paired difference to its baseline, the
  weights' diagnostics (per seed averaged over fine-tuning, then over seeds)."""
  scores = sweep.score_rows(recs)
  summary = {s["method"]: s for s in report.summarise(scores)}
  paired = {p["method"]: p for p in report.paired_differences(scores, grid.pairs)}
  rows = []
  for name, v in grid.variants.items():
    if name not in summary:
      continue
    mine = sorted((r for r in recs if r.method == name), key=lambda r: r.seed)
    row = {"run": name, "ablates": v.ablates, **summary[name]}
    row["per_seed"] = [float(r.score) for r in mine]  # unrounded: paired reprints
    if name in paired:
      p = paired[name]
      row.update(baseline=v.baseline, diff=p["mean"], diff_low=p["ci_low"], diff_high=p["ci_high"])
      row["diff_per_seed"] = p["per_seed"]  # paired by seed id (report.paired_differences)
    if v.method in config.WEIGHTED:
      row.update(report.mean_diagnostics([r.weights for r in mine]))
    moved = [r.divergence for r in mine if r.divergence is not None]
    row["divergence"] = float(np.mean(moved)) if moved else None
    if len(moved) > 1:
      row["divergence_low"], row["divergence_high"] = report.t_interval(moved)
    if v.method != "bc":
      steps = dict(v.overrides).get("finetune.steps", grid.cfg.finetune.steps)
      row["length"] = steps / grid.cfg.finetune.steps
    rows.append(row)
  return rows


LENGTH_FAMILY = ("baseline", "recipe", "fine-tuning length")  # the runs that differ in length only
PAIRED = "weighted − unweighted, paired by seed"


def by_length(grid: ControlGrid, rows: list[dict]) -> dict[str, list[dict]]:
  """{method: its ablation rows that differ in fine-tuning length only, shortest first}, for the
  methods that ran at two lengths or more."""
  runs = [r for r in rows if "length" in r and grid.variants[r["run"]].ablates in LENGTH_FAMILY]
  method = lambda r: grid.variants[r["run"]].method
  out = {}
  for m in dict.fromkeys(method(r) for r in runs):
    mine = sorted((r for r in runs if method(r) == m), key=lambda r: r["length"])
    if len(mine) > 1:
      out[m] = mine
  return out


def length_panels(grid: ControlGrid, rows: list[dict]) -> dict:
  """The dose-response against fine-tuning length, as plots.band_panels' panels: each method's
  score, each weighted method minus its unweighted counterpart (paired by seed) and how far θ
  moved from π_ref (log θ/π_ref at the end), against the length; {} when no method ran at two."""
  series = lambda rs, keys: tuple(np.array([r[k] for r in rs], float) for k in ("length", *keys))
  panels = {"score": {}, PAIRED: {}, "log θ/π_ref at the end": {}}
  for m, mine in by_length(grid, rows).items():
    panels["score"][m] = series(mine, ("mean", "ci_low", "ci_high"))
    if all("divergence_low" in r for r in mine):
      keys = ("divergence", "divergence_low", "divergence_high")
      panels["log θ/π_ref at the end"][m] = series(mine, keys)
    if all("diff" in r for r in mine):
      base = grid.variants[mine[0]["baseline"]].method
      panels[PAIRED][f"{m} − {base}"] = series(mine, ("diff", "diff_low", "diff_high"))
  return {k: v for k, v in panels.items() if v} if panels["score"] else {}


def length_trend(grid: ControlGrid, rows: list[dict]) -> list[dict]:
  """Does weighting's gain grow with fine-tuning length? Per weighted method run at two lengths
  or more: each seed's least-squares slope of (weighted − unweighted) on log10(length), i.e. the
  gain per tenfold longer fine-tuning, and the slopes' mean with its 95% Student-t interval."""
  out = []
  for m, mine in by_length(grid, rows).items():
    if not all("diff" in r for r in mine):
      continue
    gains = [r["diff_per_seed"] for r in mine]  # [lengths][seeds]
    lengths = [r["length"] for r in mine]
    base = grid.variants[mine[0]["baseline"]].method
    trend = report.paired_slopes(np.log10(lengths), gains)
    out.append({"pair": f"{m} − {base}", "lengths": lengths, **trend})
  return out


def trend_table(trend: list[dict]) -> str:
  """length_trend's rows as a Markdown table."""
  body = [
    [
      t["pair"],
      " / ".join(f"{k:g}×" for k in t["lengths"]),
      f"{t['slope']:+.1f} [{t['ci_low']:+.1f}, {t['ci_high']:+.1f}]",
      f"{t['up']}/{t['n']} up, {t['down']}/{t['n']} down",
    ]
    for t in trend
  ]
  head = ["pair", "lengths", "gain per 10× longer, paired by seed [95% t CI]", "seeds' slopes"]
  return report.format_table(head, body)


def table(rows: list[dict], baseline: str | None = "filtered_bc") -> str:
  """The ablation table; baseline None: the rows have different baselines, named in the cells."""
  vs = lambda r: "" if baseline else f" − {r['baseline']}"
  body = [
    [
      r["run"],
      r["ablates"],
      report.cell_text(r),
      " / ".join(f"{s:.1f}" for s in r["per_seed"]),
      f"{r['diff']:+.1f} [{r['diff_low']:+.1f}, {r['diff_high']:+.1f}]{vs(r)}"
      if "diff" in r
      else "–",
      "–" if r.get("divergence") is None else f"{r['divergence']:.3f}",
      *report.diagnostics_text(r),
    ]
    for r in rows
  ]
  head = [
    "run",
    "ablates",
    "score: mean ± std [95% CI]",
    "per seed",
    f"− {baseline or 'baseline'}, paired [95% CI]",
    "log θ/π_ref at end",
    *report.DIAGNOSTICS_HEADER,
  ]
  return report.format_table(head, body)


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  try:
    seeds = [int(s) for s in F.seeds]
    floats = lambda xs: [float(x) for x in xs]
    if F.family == "curation":
      todo = curation_variants(F.config, floats(F.percentiles), floats(F.betas), F.batch)
      header = f"curation sharpness against importance weighting on {F.dataset}"
    elif F.family == "length":
      todo = length_variants(F.config, floats(F.lengths))
      header = f"importance weighting against fine-tuning length on {F.dataset}"
    else:
      todo = variants(F.config, floats(F.temperatures), floats(F.q_decays), F.long, F.method)
      header = f"{F.method} ablations on {F.dataset}"
  except ValueError as e:
    cli.fail(f"seeds, percentiles, betas, temperatures and q decays must be numbers: {e}")
  grid = AblationGrid(F.config, todo, [F.dataset], seeds, seeds_per_group=0)
  sweep.run_sweep(grid, F.workdir, F.overwrite, header=header, part=(F.part, F.parts))


if __name__ == "__main__":
  cli.run(main)
