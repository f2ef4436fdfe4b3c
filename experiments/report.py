"""Reprint a finished sweep's (or ablation's) tables from its CSV files, with the current
interval method.

  python experiments/report.py --dir=docs/sweep-walker2d-full [--write]
  python experiments/report.py --dir=docs/ablations-full-hopper/iw_sft --ablation
  python experiments/report.py --dir=OUT --merge=runs/a,runs/b --write
  python experiments/report.py --dir=OUT --ablation --merge=docs/length-hopper,runs/length-x10

--merge joins sweeps of the same grid run on other seeds (another session's, another machine's)
into --dir: their cells.csv (a (dataset, method, seed) in two of them is an error), the tables
recomputed from those cells, the pairs of their paired.csv, their paired-by-problem counts
(problems.csv: n, b and c add over seeds, and the test depends on them alone) and their weight
diagnostics (weights.csv: means over seeds, weighted by each sweep's seeds; a diagnostic one of
the sweeps did not record is the mean over the others' seeds, and its cell says over how many).

--ablation --merge joins pieces of one ablation instead: runs at other lengths, or of the other
weighted method, run in workdirs of their own (in other sessions, or side by side), each with the
same π_ref (a run in two pieces, π_ref's, must have the same return for every seed there, or it is
an error; equal returns with other normalised scores are said in table.md's first line). It writes
into --dir the joined ablations.csv and cells.csv, table.md (the ablation table and the length
trend, experiments/ablations.py's), ablations.png and length.png.

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

import os

from absl import flags

from iwsft import sweep
from iwsft.control import ablation_tables
from iwsft.control.config import UNWEIGHTED
from iwsft.errors import UserError
from iwsft.io import cli, report

flags.DEFINE_string("dir", None, "a sweep's output directory (its table.csv at least)")
flags.DEFINE_bool("write", False, "rewrite table.md, table.csv and paired.csv in --dir")
flags.DEFINE_integer("bootstrap_seed", 0, "seed of the aggregates' stratified bootstrap")
flags.DEFINE_bool(
  "ablation", False, "--dir holds experiments/ablations.py's ablations.csv (--merge: its pieces)"
)
flags.DEFINE_list(
  "merge", [], "sweeps on other seeds (with --ablation: pieces of one ablation) to join into --dir"
)
flags.mark_flag_as_required("dir")

PAIRS = UNWEIGHTED  # the control grid's pairs: each weighted method and its unweighted twin


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
  """An ablation's tables (experiments/ablations.py's), reprinted from its CSV file."""
  rows = report.read_csv(os.path.join(d, "ablations.csv")) or report.read_csv(
    os.path.join(d, "table.csv")
  )
  if not rows:  # table.csv: written by experiments/ablations.py before 0.4.0
    raise UserError(f"{d} has no ablations.csv (or table.csv of an older ablation)")
  return ablation_tables.text(ablation_tables.from_csv(rows))


def join_ablation(dirs: list[str], out: str) -> str:
  """Writes into `out` the ablation whose pieces are `dirs` (ablation_tables.join); returns the
  text of its table.md."""
  rows, cells, apart = ablation_tables.join(dirs)
  os.makedirs(out, exist_ok=True)
  dataset = cells[0]["dataset"]
  text, _ = ablation_tables.write(rows, out, dataset)
  shared = (
    f"; the cells the pieces share have the same returns, their normalised scores differ by up"
    f" to {apart:.1e} (the pieces' datasets carry other reference scores)"
    if apart
    else ""
  )
  text = f"{dataset}: an ablation joined from {', '.join(dirs)}{shared}\n{text}"
  cells = [dict(c, cell=os.path.relpath(c["cell"], out)) for c in cells]
  report.write_csv(os.path.join(out, "cells.csv"), cells, sweep.CELL_COLUMNS)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  return text


def merge(dirs: list[str], out: str) -> None:
  """Writes into `out` the union of the sweeps in `dirs` (see the module's docstring)."""
  cells = [c for d in dirs for c in report.read_csv(os.path.join(d, "cells.csv"))]
  if not cells:
    raise UserError(f"--merge: no cells.csv in {', '.join(dirs)}")
  seen = set()
  for c in cells:
    key = (c["dataset"], c["method"], c["seed"])
    if key in seen:
      raise UserError(f"--merge: {key} is in two of the sweeps")
    seen.add(key)
  recs = [dict(c, seed=int(c["seed"]), score=float(c["score"])) for c in cells]
  pairs = {
    r["method"]: r["baseline"] for d in dirs for r in report.read_csv(os.path.join(d, "paired.csv"))
  }
  os.makedirs(out, exist_ok=True)
  report.write_csv(os.path.join(out, "cells.csv"), cells, list(cells[0]))
  report.write_csv(os.path.join(out, "table.csv"), report.summarise(recs), report.SUMMARY_COLUMNS)
  if pairs:
    paired = report.paired_differences(recs, pairs)
    report.write_csv(os.path.join(out, "paired.csv"), paired, report.PAIRED_COLUMNS)
  _merge_problems(dirs, out)
  _merge_weights(dirs, out)


def _merge_problems(dirs: list[str], out: str) -> None:
  pooled: dict[tuple, dict] = {}
  for r in (r for d in dirs for r in report.read_csv(os.path.join(d, "problems.csv"))):
    p = pooled.setdefault((r["method"], r["baseline"], r["mode"]), dict(n=0, b=0, c=0, seeds=[]))
    p["n"] += int(r["problems"])
    p["b"] += int(r["b"])
    p["c"] += int(r["c"])
    p["seeds"] += r["seeds"].split(";")
  rows = [
    {"method": m, "baseline": base, "mode": mode, "seeds": sorted(p["seeds"], key=int),
     **report.problem_test(p["n"], p["b"], p["c"])}
    for (m, base, mode), p in pooled.items()
  ]  # fmt: skip
  if rows:
    report.write_csv(os.path.join(out, "problems.csv"), rows, report.PROBLEM_COLUMNS)


def _merge_weights(dirs: list[str], out: str) -> None:
  groups: dict[tuple, list[dict]] = {}
  for r in (r for d in dirs for r in report.read_csv(os.path.join(d, "weights.csv"))):
    groups.setdefault((r["dataset"], r["method"]), []).append(r)
  rows = []
  for (dataset, method), rs in groups.items():
    n = [int(r["n"]) for r in rs]
    row = {"dataset": dataset, "method": method, "n": sum(n)}
    for k in report.WEIGHT_DIAGNOSTICS:
      have = [(float(r[k]), w) for r, w in zip(rs, n) if r.get(k, "") != ""]
      seeds = sum(w for _, w in have)
      row[k] = sum(x * w for x, w in have) / seeds if have else ""
      row[report.seeds_of(k)] = seeds
    row["seeds"] = [s for r in rs for s in r["seeds"].split(";")]
    rows.append(row)
  if rows:
    counts = [report.seeds_of(k) for k in report.WEIGHT_DIAGNOSTICS]
    fields = ["dataset", "method", "n", *report.WEIGHT_DIAGNOSTICS, *counts, "seeds"]
    report.write_csv(os.path.join(out, "weights.csv"), rows, fields)


def main(argv):
  cli.no_arguments(argv)
  d = flags.FLAGS.dir
  if flags.FLAGS.ablation:
    print(join_ablation(flags.FLAGS.merge, d) if flags.FLAGS.merge else ablation_table(d))
    return
  if flags.FLAGS.merge:
    merge(flags.FLAGS.merge, d)
  table = [_with_t(r) for r in report.read_csv(os.path.join(d, "table.csv"))]
  if not table:
    raise UserError(f"{d} has no table.csv")
  text = (
    "score: mean ± std [95% Student-t CI of the mean]\n\n" + report.markdown_table(table) + "\n"
  )
  paired = []
  for r in report.read_csv(os.path.join(d, "paired.csv")):
    p = _with_t(r)
    p["per_seed"] = [float(x) for x in r["per_seed"].split(";")]
    p["above"], p["below"] = int(r["above"]), int(r["below"])
    paired.append(p)
  if paired:
    text += "\npaired by seed: mean [95% Student-t CI]\n\n"
    text += report.paired_table(paired) + "\n"
  problems = report.read_csv(os.path.join(d, "problems.csv"))
  text += report.problem_pairs_text(problems) if problems else ""
  cells = report.read_csv(os.path.join(d, "cells.csv"))
  iqm = poi = []
  if cells and not problems:  # a language sweep's "datasets" are two readings of one evaluation
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
    text += report.weights_table([_floats(r) for r in report.read_csv(weights)]) + "\n"
  with open(os.path.join(d, "table.md"), "w") as f:
    f.write(text)
  report.write_csv(os.path.join(d, "table.csv"), table, report.SUMMARY_COLUMNS)
  if paired:
    report.write_csv(os.path.join(d, "paired.csv"), paired, report.PAIRED_COLUMNS)
  if iqm:
    report.write_aggregate(os.path.join(d, "aggregate.csv"), iqm, poi)


def _floats(row: dict) -> dict:
  diag = report.WEIGHT_DIAGNOSTICS
  counts = {report.seeds_of(k) for k in diag}
  number = lambda k, v: None if v == "" else float(v) if k in diag else int(v)
  return {k: number(k, v) if k in diag or k in counts else v for k, v in row.items()}


if __name__ == "__main__":
  cli.run(main)
