"""Sweep results -> paper-style tables: mean, std and a 95% bootstrap confidence interval per cell.

Both pipelines reduce their runs to records, one per (dataset, method, seed):
  {"dataset": str, "method": str, "seed": int, "score": float | None}
and everything here works on those: `summarise` groups them, `markdown_table` lays them out like
the paper (a row per dataset, a column per method, an average row), `write_csv` keeps every number.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
  values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` [n] (resampling with replacement).

  One value gives a zero-width interval at that value; seeded, so tables are reproducible.
  """
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("bootstrap_ci of no values")
  idx = np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))
  means = x[idx].mean(axis=1)
  alpha = (1.0 - level) / 2
  return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def summarise(records: Sequence[dict], level: float = 0.95, seed: int = 0) -> list[dict]:
  """One row per (dataset, method) in first-seen order: n, mean, std (ddof=1; 0 for one seed),
  ci_low, ci_high and the seeds. Records whose score is None (no reference scores) are left out."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in records:
    if r.get("score") is not None:
      groups.setdefault((r["dataset"], r["method"]), []).append(r)
  rows = []
  for (dataset, method), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    x = np.array([r["score"] for r in rs], np.float64)
    lo, hi = bootstrap_ci(x, level, seed=seed)
    rows.append(
      {
        "dataset": dataset,
        "method": method,
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "ci_low": lo,
        "ci_high": hi,
        "seeds": [r["seed"] for r in rs],
      }
    )
  return rows


def paired_differences(
  records: Sequence[dict], pairs: dict[str, str], level: float = 0.95, seed: int = 0
) -> list[dict]:
  """Per dataset and pair of `pairs` ({method: baseline}), the per-seed differences method −
  baseline over the seeds both have, summarised as `summarise` does (n, mean, std, ci_low,
  ci_high, seeds), with the baseline, the differences per seed and on how many seeds the
  method is above / below its baseline (a difference that rounds to 0.0 is neither).

  Pairing by seed is what makes the difference sharper than the two scores' CIs: a seed gives
  both methods the same π_ref and the same random stream, so what they share cancels."""
  scores = {
    (r["dataset"], r["method"], r["seed"]): r["score"]
    for r in records
    if r.get("score") is not None
  }
  diffs = [
    {"dataset": d, "method": m, "seed": s, "score": x - scores[(d, pairs[m], s)]}
    for (d, m, s), x in scores.items()
    if m in pairs and (d, pairs[m], s) in scores
  ]
  rows = summarise(diffs, level, seed)
  by_cell = {(r["dataset"], r["method"], r["seed"]): r["score"] for r in diffs}
  for row in rows:
    per_seed = [by_cell[(row["dataset"], row["method"], s)] for s in row["seeds"]]
    shown = [round(x, 1) for x in per_seed]  # at the tables' precision: float noise is no change
    row.update(
      baseline=pairs[row["method"]],
      per_seed=per_seed,
      above=sum(x > 0 for x in shown),
      below=sum(x < 0 for x in shown),
    )
  return rows


def paired_table(rows: Sequence[dict], datasets: Sequence[str] = ()) -> str:
  """Datasets as rows, one column per pair: "mean [ci_low, ci_high] (a/n up, b/n down)"."""
  cells = {(r["dataset"], r["method"]): r for r in rows}
  pairs = list(dict.fromkeys((r["method"], r["baseline"]) for r in rows))
  body = [
    [d]
    + [
      f"{c['mean']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]"
      f" ({c['above']}/{c['n']} up, {c['below']}/{c['n']} down)"
      if (c := cells.get((d, m)))
      else "–"
      for m, _ in pairs
    ]
    for d in _ordered([r["dataset"] for r in rows], list(datasets))
  ]
  return format_table(["dataset", *(f"{m} − {b}" for m, b in pairs)], body)


WEIGHT_DIAGNOSTICS = ("iw/ess_fraction", "iw/max_weight", "iw/clip_fraction", "iw/mean_log_ratio")
DIAGNOSTICS_HEADER = ["ESS / batch", "max w", "clipped", "mean log q/π_ref"]


def weight_diagnostics(rows: Sequence[dict], stage: str) -> dict[str, float]:
  """One run's WEIGHT_DIAGNOSTICS over a stage: each one its train rows (metrics.jsonl rows)
  log, averaged over those rows; {} when there are none."""
  train = [r for r in rows if r.get("kind") == "train" and r.get("stage") == stage]
  return {
    k: float(np.mean([r[k] for r in train])) for k in WEIGHT_DIAGNOSTICS if train and k in train[0]
  }


def mean_diagnostics(runs: Sequence[dict]) -> dict[str, float]:
  """weight_diagnostics of several runs (seeds) -> each diagnostic's mean over the runs that
  log it (left out where none does)."""
  out = {}
  for k in WEIGHT_DIAGNOSTICS:
    values = [d[k] for d in runs if k in d]
    if values:
      out[k] = float(np.mean(values))
  return out


def diagnostics_text(row: dict) -> list[str]:
  """The DIAGNOSTICS_HEADER cells of a row holding WEIGHT_DIAGNOSTICS ("–" where one is missing)."""
  formats = zip(WEIGHT_DIAGNOSTICS, ("{:.2f}", "{:.1f}", "{:.2f}", "{:.3f}"))
  return [f.format(row[k]) if row.get(k) is not None else "–" for k, f in formats]


def _ordered(values, order):
  seen = list(dict.fromkeys(values))
  return [v for v in order if v in seen] + [v for v in seen if v not in order] if order else seen


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """The one Markdown table writer: a header row, a rule, then one line per row of cells."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def markdown_table(
  summary: Sequence[dict],
  methods: Sequence[str] = (),
  datasets: Sequence[str] = (),
  label=lambda d: d,
) -> str:
  """Datasets as rows, methods as columns; cells "mean ± std [ci_low, ci_high]", then an average row
  (mean over datasets of the per-dataset means; only for methods present on every dataset)."""
  cells = {(r["dataset"], r["method"]): r for r in summary}
  methods = _ordered([r["method"] for r in summary], list(methods))
  datasets = _ordered([r["dataset"] for r in summary], list(datasets))
  rows = [[label(d)] + [cell_text(cells.get((d, m))) for m in methods] for d in datasets]
  if len(datasets) > 1:
    avg = []
    for m in methods:
      means = [cells[(d, m)]["mean"] for d in datasets if (d, m) in cells]
      avg.append(f"{np.mean(means):.1f}" if len(means) == len(datasets) else "–")
    rows.append(["average", *avg])
  return format_table(["dataset", *methods], rows)


def cell_text(row: dict | None) -> str:
  """A summary row as "mean ± std [ci_low, ci_high]" ("–" for a missing cell)."""
  if row is None:
    return "–"
  return f"{row['mean']:.1f} ± {row['std']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"


def write_csv(path: str, rows: Sequence[dict], fields: Sequence[str]) -> None:
  """rows as CSV with the given columns (lists are joined with ';')."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})


def curve_band(curves: Sequence[tuple[Sequence[int], Sequence[float]]], level: float = 0.95):
  """Seeds' curves (steps, values) -> (steps, mean, ci_low, ci_high) on the steps every seed has."""
  common = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
  if not common:
    return [], np.array([]), np.array([]), np.array([])
  table = np.array([[dict(zip(s, v))[t] for t in common] for s, v in curves], np.float64)
  ci = np.array([bootstrap_ci(table[:, j], level) for j in range(len(common))]).reshape(-1, 2)
  return common, table.mean(axis=0), ci[:, 0], ci[:, 1]
