"""Reprint a finished sweep's (or ablation's) tables from its CSV files, with the current
interval method.

  python experiments/report.py --dir=docs/sweep-walker2d-full [--write]
  python experiments/report.py --dir=docs/ablations-full-hopper/iw_sft --ablation

An ablation's ablations.csv (table.csv before 0.4.0) has each run's mean and std (exact) and its
per-seed scores (rounded to 0.1 in tables written before 0.3.0): its paired differences are
recomputed from those scores.

Reads table.csv (per cell: n, mean, std, seeds) and, where present, paired.csv (per pair: n, mean,
std and the per-seed differences), cells.csv (every seed's score: the rliable aggregates) and
weights.csv, and prints the scores table, the paired differences and the aggregates with 95%
Student-t intervals (report.t_interval: the interval depends on n, mean and std only, so it is
exact from the CSV files). --write also rewrites table.md, table.csv and paired.csv there, and
writes aggregate.csv when cells.csv allows it.
"""

import csv
import os

from absl import flags

from iwsft.control.config import UNWEIGHTED
from iwsft.errors import UserError
from iwsft.io import cli, report

flags.DEFINE_string("dir", None, "a sweep's output directory (its table.csv at least)")
flags.DEFINE_bool("write", False, "rewrite table.md, table.csv and paired.csv in --dir")
flags.DEFINE_integer("bootstrap_seed", 0, "seed of the aggregates' stratified bootstrap")
flags.DEFINE_bool("ablation", False, "--dir holds experiments/ablations.py's ablations.csv")
flags.mark_flag_as_required("dir")

PAIRS = UNWEIGHTED  # the control grid's pairs: each weighted method and its unweighted twin


def _rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


def _with_t(row: dict) -> dict:
  """A CSV row with n, mean, std as numbers and its t-interval (report.t_interval_of)."""
  n, mean, std = int(row["n"]), float(row["mean"]), float(row["std"])
  lo, hi = report.t_interval_of(mean, std, n)
  return {
    **row,
    "n": n,
    "mean": mean,
    "std": std,
    "seeds": row["seeds"].split(";"),
    "ci_low": lo,
    "ci_high": hi,
  }


def ablation_table(d: str) -> str:
  """An ablation's runs with t-intervals of their scores and of their paired differences."""
  rows = _rows(os.path.join(d, "ablations.csv")) or _rows(os.path.join(d, "table.csv"))
  if not rows:  # table.csv: written by experiments/ablations.py before 0.4.0
    raise UserError(f"{d} has no ablations.csv (or table.csv of an older ablation)")
  seeds = {r["run"]: [float(x) for x in r["per_seed"].split(";")] for r in rows}
  body = []
  for r in rows:
    x = seeds[r["run"]]
    lo, hi = report.t_interval_of(float(r["mean"]), float(r["std"]), len(x))
    cell = f"{float(r['mean']):.1f} ± {float(r['std']):.1f} [{lo:.1f}, {hi:.1f}]"
    diff = "–"
    if r["baseline"]:
      delta = [a - b for a, b in zip(x, seeds[r["baseline"]], strict=True)]
      dlo, dhi = report.t_interval(delta)
      diff = f"{sum(delta) / len(delta):+.1f} [{dlo:+.1f}, {dhi:+.1f}] − {r['baseline']}"
    body.append([r["run"], r["ablates"], cell, " / ".join(f"{v:.1f}" for v in x), diff])
  head = ["run", "ablates", "score: mean ± std [95% t CI]", "per seed", "paired [95% t CI]"]
  return report.format_table(head, body)


def main(argv):
  cli.no_arguments(argv)
  d = flags.FLAGS.dir
  if flags.FLAGS.ablation:
    print(ablation_table(d))
    return
  table = [_with_t(r) for r in _rows(os.path.join(d, "table.csv"))]
  if not table:
    raise UserError(f"{d} has no table.csv")
  text = (
    "score: mean ± std [95% Student-t CI of the mean]\n\n" + report.markdown_table(table) + "\n"
  )
  paired = []
  for r in _rows(os.path.join(d, "paired.csv")):
    p = _with_t(r)
    p["per_seed"] = [float(x) for x in r["per_seed"].split(";")]
    p["above"], p["below"] = int(r["above"]), int(r["below"])
    paired.append(p)
  if paired:
    text += "\npaired by seed: mean [95% Student-t CI]\n\n"
    text += report.paired_table(paired) + "\n"
  cells = _rows(os.path.join(d, "cells.csv"))
  iqm = poi = []
  if cells:
    recs = [dict(c, seed=int(c["seed"]), score=float(c["score"])) for c in cells]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    iqm, poi = report.aggregate(recs, methods, PAIRS, seed=flags.FLAGS.bootstrap_seed)
    if iqm:
      text += "\nacross datasets (rliable), 95% stratified-bootstrap CIs\n\n"
      text += report.aggregate_text(iqm, poi) + "\n"
  print(text)
  if flags.FLAGS.write:
    _write(d, text, table, paired, iqm, poi)


def _write(d: str, text: str, table, paired, iqm, poi) -> None:
  weights = os.path.join(d, "weights.csv")
  if os.path.exists(weights):
    text += "\nthe importance weights, per seed over fine-tuning, then over seeds\n\n"
    text += report.weights_table([_floats(r) for r in _rows(weights)]) + "\n"
  with open(os.path.join(d, "table.md"), "w") as f:
    f.write(text)
  report.write_csv(os.path.join(d, "table.csv"), table, report.SUMMARY_COLUMNS)
  if paired:
    report.write_csv(os.path.join(d, "paired.csv"), paired, report.PAIRED_COLUMNS)
  if iqm:
    report.write_aggregate(os.path.join(d, "aggregate.csv"), iqm, poi)


def _floats(row: dict) -> dict:
  return {k: float(v) if k in report.WEIGHT_DIAGNOSTICS and v != "" else v for k, v in row.items()}


if __name__ == "__main__":
  cli.run(main)
