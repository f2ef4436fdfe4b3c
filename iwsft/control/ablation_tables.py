"""An ablation's runs -> its tables and figures: each run paired by seed with its baseline, the
length family's dose-response against the fine-tuning length and its trend, and the join of an
ablation run in pieces (other lengths, in other sessions) from the CSV files each piece wrote,
and a finished ablation's rows read back from its ablations.csv (`from_csv`) to reprint them.

A row (`rows`) is one run: run (its name), method, ablates, length (its fine-tuning steps over the
recipe's; None for π_ref), the score's n, mean, std, ci_low, ci_high, seeds and per_seed [seeds];
where the run has a baseline: baseline, diff, diff_low, diff_high and diff_per_seed [seeds] (paired
by seed id); divergence (mean log θ/π_ref on the curated episodes at the end) with its interval;
the weights' diagnostics (report.WEIGHT_DIAGNOSTICS) for weighted runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from iwsft.errors import UserError
from iwsft.io import plots, report

COLUMNS = ["run", "method", "ablates", "length", "mean", "std", "ci_low", "ci_high", "seeds"]
COLUMNS += ["per_seed", "baseline", "diff", "diff_low", "diff_high"]
COLUMNS += ["divergence", "divergence_low", "divergence_high", *report.WEIGHT_DIAGNOSTICS]
LONGER = "fine-tuning length"  # what a run ablates that is the recipe's method fine-tuned longer
LENGTH_FAMILY = ("baseline", "recipe", LONGER)  # the runs that differ in length only
PAIRED = "weighted − unweighted, paired by seed"


def length_label(length: float) -> str:
  """What a weighted run of the length family ablates at `length` × the recipe's fine-tuning."""
  return "recipe" if length == 1 else LONGER


def rows(cells: Sequence[dict], runs: dict[str, dict], weights: dict[str, dict]) -> list[dict]:
  """The ablation's rows, in the order of `runs`, for the runs with finished cells.

  cells: one dataset's cells.csv rows {method (the run's name), seed, score, divergence};
  runs: {name: {method, ablates, baseline ("" for none), length (None for π_ref)}};
  weights: {name: its diagnostics averaged over seeds} for weighted runs."""
  summary = {s["method"]: s for s in report.summarise(cells)}
  pairs = {name: r["baseline"] for name, r in runs.items() if r["baseline"]}
  paired = {p["method"]: p for p in report.paired_differences(cells, pairs)}
  out = []
  for name, run in runs.items():
    if name not in summary:
      continue
    mine = sorted((c for c in cells if c["method"] == name), key=lambda c: c["seed"])
    row = {**summary[name], "run": name, "method": run["method"], "ablates": run["ablates"]}
    row["per_seed"] = [float(c["score"]) for c in mine]  # unrounded: paired reprints
    if name in paired:
      p = paired[name]
      row.update(baseline=p["baseline"], diff=p["mean"], diff_low=p["ci_low"])
      row.update(diff_high=p["ci_high"], diff_per_seed=p["per_seed"])
    row.update(weights.get(name, {}))
    moved = [float(c["divergence"]) for c in mine if c.get("divergence") not in (None, "")]
    row["divergence"] = float(np.mean(moved)) if moved else None
    if len(moved) > 1:
      row["divergence_low"], row["divergence_high"] = report.t_interval(moved)
    if run["length"] is not None:
      row["length"] = run["length"]
    out.append(row)
  return out


def join(dirs: Sequence[str]) -> tuple[list[dict], list[dict], float]:
  """The rows and cells of one ablation run in pieces, and how far the normalised scores of the
  cells the pieces share lie apart: each of `dirs` a finished piece's output (its ablations.csv
  and cells.csv). A run in two pieces (π_ref, trained by each) must be the same run there, seed
  for seed: the same raw return (the same score where no return is recorded); otherwise the
  pieces did not share π_ref and pairing across them would mislead. Equal returns with other
  normalised scores mean the pieces' datasets carry other reference scores (another recording of
  the same expert): the third value says by how much. Runs keep the order they first appear in."""
  runs, cells, seeds_of, apart = {}, {}, {}, 0.0
  for d in dirs:
    table, mine = (
      report.read_csv(os.path.join(d, "ablations.csv")),
      report.read_csv(os.path.join(d, "cells.csv")),
    )
    if not table or not mine:
      raise UserError(f"{d} holds no finished ablation (its ablations.csv and cells.csv)")
    for c in mine:
      c = dict(c, seed=int(c["seed"]), score=float(c["score"]), cell=os.path.join(d, c["cell"]))
      key = (c["dataset"], c["method"], c["seed"])
      if key in cells:
        raw = "return_mean" if cells[key].get("return_mean") and c.get("return_mean") else "score"
        if float(cells[key][raw]) != float(c[raw]):
          raise UserError(
            f"{c['method']} seed {c['seed']}: {raw} {cells[key][raw]} in one piece and"
            f" {c[raw]} in {d}: the pieces do not share π_ref (another dataset build or CPU?)"
          )
        apart = max(apart, abs(cells[key]["score"] - c["score"]))
      cells.setdefault(key, c)
    for r in table:
      here = sorted(c["seed"] for c in mine if c["method"] == r["run"])
      if seeds_of.setdefault(r["run"], here) != here:
        raise UserError(f"{r['run']} ran on other seeds in {d}: join seeds with --merge alone")
      runs.setdefault(r["run"], r)
  if len({k[0] for k in cells}) > 1:
    raise UserError(f"the pieces are of different datasets: {sorted({k[0] for k in cells})}")
  meta = {name: _csv_run(r) for name, r in runs.items()}
  weights = {name: _csv_weights(r) for name, r in runs.items()}
  return rows(list(cells.values()), meta, weights), list(cells.values()), apart


def _csv_run(r: dict) -> dict:
  """An ablations.csv row's run as `rows` takes it: method, ablates, baseline, length."""
  length = float(r["length"]) if r.get("length") else None
  ablates = r["ablates"]
  if ablates == LONGER:  # older files label the family's 1x runs so too
    ablates = length_label(length)
  return {
    "method": r.get("method") or r["run"].split()[0],  # files before the column: "<method> <tag>"
    "ablates": ablates,
    "baseline": r["baseline"],
    "length": length,
  }


def _csv_weights(r: dict) -> dict:
  """An ablations.csv row's weight diagnostics, those it recorded."""
  return {k: float(r[k]) for k in report.WEIGHT_DIAGNOSTICS if r.get(k)}


def write(rows: list[dict], workdir: str, dataset: str) -> tuple[str, list[str]]:
  """Writes ablations.csv, ablations.png and (where a method ran at two lengths) length.png into
  workdir; returns the ablation table and the length trend as text, and the files written."""
  report.write_csv(os.path.join(workdir, "ablations.csv"), rows, COLUMNS)
  plots.score_bars(
    rows,
    os.path.join(workdir, "ablations.png"),
    "normalised score ×100",
    f"{dataset}: ablations\nmean over seeds, 95% Student-t CI",
    name="run",
    points=[r["per_seed"] for r in rows],
  )
  outputs = ["ablations.csv", "ablations.png"]
  panels = length_panels(rows)
  if panels:
    plots.band_panels(
      panels,
      os.path.join(workdir, "length.png"),
      "fine-tuning updates (× the recipe's)",
      {"score": "normalised score ×100", PAIRED: "score difference"},
      f"{dataset}: fine-tuning length\nmean over seeds, 95% Student-t CI",
      log_x=True,
    )
    outputs.append("length.png")
  return text(rows), outputs


def text(rows: list[dict]) -> str:
  """The ablation table and, where a weighted method ran at two lengths, the length trend."""
  bases = {r["baseline"] for r in rows if r.get("baseline")}
  out = (
    "\nThe ablations, each paired by seed with its baseline; weight diagnostics averaged over"
    f" fine-tuning\n\n{table(rows, bases.pop() if len(bases) == 1 else None)}\n"
  )
  trend = length_trend(rows)
  if trend:
    out += (
      "\nDoes the weights' gain grow with fine-tuning length? Each seed's least-squares slope of"
      " (weighted − unweighted) on log10 of the length, then their mean over seeds\n\n"
      f"{trend_table(trend)}\n"
    )
  return out


def from_csv(csv_rows: Sequence[dict]) -> list[dict]:
  """An ablations.csv's rows (`write`'s; table.csv's before 0.4.0) as `rows` gives them, the
  intervals recomputed: each run's from its mean, std and number of seeds, each paired difference
  from the per-seed scores (by seed id; by position in files without a seeds column, whose runs
  all share their seeds). Divergence and weight diagnostics as recorded."""
  number = lambda v: None if v in (None, "") else float(v)
  scores, seeds = {}, {}
  for r in csv_rows:  # seeds sorted, as `rows` has them: a pair and a trend align by seed
    x = [float(v) for v in r["per_seed"].split(";")]
    ids = [int(s) for s in r["seeds"].split(";")] if r.get("seeds") else list(range(len(x)))
    seeds[r["run"]], scores[r["run"]] = map(list, zip(*sorted(zip(ids, x)), strict=True))
  out = []
  for r in csv_rows:
    x, mean, std, run = scores[r["run"]], float(r["mean"]), float(r["std"]), _csv_run(r)
    lo, hi = report.t_interval_of(mean, std, len(x))
    row = {"run": r["run"], "method": run["method"], "ablates": run["ablates"]}
    row.update(n=len(x), mean=mean, std=std, ci_low=lo, ci_high=hi)
    row.update(seeds=seeds[r["run"]], per_seed=x)
    if run["length"] is not None:
      row["length"] = run["length"]
    if r["baseline"]:
      base = dict(zip(seeds[r["baseline"]], scores[r["baseline"]], strict=True))
      delta = [a - base[s] for s, a in zip(seeds[r["run"]], x, strict=True)]
      d_lo, d_hi = report.t_interval(delta)
      row.update(baseline=r["baseline"], diff=float(np.mean(delta)), diff_low=d_lo)
      row.update(diff_high=d_hi, diff_per_seed=delta)
    row["divergence"] = number(r.get("divergence"))
    if number(r.get("divergence_low")) is not None:
      row["divergence_low"] = float(r["divergence_low"])
      row["divergence_high"] = float(r["divergence_high"])
    row.update(_csv_weights(r))
    out.append(row)
  return out


def by_length(rows: list[dict]) -> dict[str, list[dict]]:
  """{method: its rows that differ in fine-tuning length only, shortest first}, for the methods
  that ran at two lengths or more."""
  runs = [r for r in rows if r.get("length") is not None and r["ablates"] in LENGTH_FAMILY]
  out = {}
  for m in dict.fromkeys(r["method"] for r in runs):
    mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["length"])
    if len(mine) > 1:
      out[m] = mine
  return out


def length_panels(rows: list[dict]) -> dict:
  """The dose-response against fine-tuning length, as plots.band_panels' panels: each method's
  score, each weighted method minus its unweighted counterpart (paired by seed) and how far θ
  moved from π_ref (log θ/π_ref at the end), against the length; {} when no method ran at two."""
  series = lambda rs, keys: tuple(np.array([r[k] for r in rs], float) for k in ("length", *keys))
  panels = {"score": {}, PAIRED: {}, "log θ/π_ref at the end": {}}
  for m, mine in by_length(rows).items():
    panels["score"][m] = series(mine, ("mean", "ci_low", "ci_high"))
    if all("divergence_low" in r for r in mine):
      keys = ("divergence", "divergence_low", "divergence_high")
      panels["log θ/π_ref at the end"][m] = series(mine, keys)
    if all("diff" in r for r in mine):
      panels[PAIRED][f"{m} − {_baseline_method(rows, mine[0])}"] = series(
        mine, ("diff", "diff_low", "diff_high")
      )
  return {k: v for k, v in panels.items() if v} if panels["score"] else {}


def length_trend(rows: list[dict]) -> list[dict]:
  """Does weighting's gain grow with fine-tuning length? Per weighted method run at two lengths
  or more: each seed's least-squares slope of (weighted − unweighted) on log10(length), i.e. the
  gain per tenfold longer fine-tuning, and the slopes' mean with its 95% Student-t interval."""
  out = []
  for m, mine in by_length(rows).items():
    if not all("diff" in r for r in mine):
      continue
    if any(r["seeds"] != mine[0]["seeds"] for r in mine):
      raise UserError(f"{m} ran on other seeds at different lengths: no per-seed trend")
    gains = [r["diff_per_seed"] for r in mine]  # [lengths][seeds]
    lengths = [r["length"] for r in mine]
    trend = report.paired_slopes(np.log10(lengths), gains)
    out.append({"pair": f"{m} − {_baseline_method(rows, mine[0])}", "lengths": lengths, **trend})
  return out


def _baseline_method(rows: list[dict], row: dict) -> str:
  return next(r["method"] for r in rows if r["run"] == row["baseline"])


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
