"""Sweep results -> paper-style tables: mean, std and a 95% Student-t interval of the mean per cell.

Both pipelines reduce their runs to records, one per (dataset, method, seed):
  {"dataset": str, "method": str, "seed": int, "score": float | None}
and everything here works on those: `summarise` groups them, `paired_differences` compares two
methods seed by seed, `aggregate` summarises across datasets the rliable way (IQM and probability
of improvement with stratified-bootstrap intervals), `markdown_table` lays cells out like the paper
(a row per dataset, a column per method, an average row), `write_csv` keeps every number.

Why Student-t: with 3-10 seeds a percentile bootstrap of the mean is too narrow (over 3 values it
is their range; its coverage of a normal mean is about 76% at n = 3). The t-interval's coverage
is exact for normal data and is checked by simulation in the tests.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence

import numpy as np

SUMMARY_COLUMNS = ["dataset", "method", "n", "mean", "std", "ci_low", "ci_high", "seeds"]
PAIRED_COLUMNS = ["dataset", "method", "baseline", "n", "mean", "std", "ci_low", "ci_high"]
PAIRED_COLUMNS += ["above", "below", "seeds", "per_seed"]
PROBLEM_COLUMNS = ["method", "baseline", "mode", "problems", "b", "c", "diff", "ci_low", "ci_high"]
PROBLEM_COLUMNS += ["p", "seeds"]
AGGREGATE_COLUMNS = [
  "statistic",
  "method",
  "baseline",
  "value",
  "ci_low",
  "ci_high",
  "datasets",
  "seeds",
]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Student-t interval of the mean of `values` [n]: mean ± t_{n-1} · std(ddof=1) / √n.

  Fewer than two values have no interval: (nan, nan)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("t_interval of no values")
  std = float(x.std(ddof=1)) if x.size > 1 else 0.0
  return t_interval_of(float(x.mean()), std, int(x.size), level)


def t_interval_of(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
  """The same interval from a sample's mean, standard deviation (ddof=1) and size."""
  from scipy import stats

  if n < 2:
    return float("nan"), float("nan")
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / np.sqrt(n)
  return mean - half, mean + half


def summarise(records: Sequence[dict], level: float = 0.95) -> list[dict]:
  """One row per (dataset, method) in first-seen order: n, mean, std (ddof=1; 0 for one seed),
  ci_low, ci_high (t_interval; nan for one seed) and the seeds. Records whose score is None (no
  reference scores) are left out."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in records:
    if r.get("score") is not None:
      groups.setdefault((r["dataset"], r["method"]), []).append(r)
  rows = []
  for (dataset, method), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    x = np.array([r["score"] for r in rs], np.float64)
    lo, hi = t_interval(x, level)
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
  records: Sequence[dict], pairs: dict[str, str], level: float = 0.95
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
  rows = summarise(diffs, level)
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


def paired_slopes(x: Sequence[float], y, level: float = 0.95) -> dict:
  """A trend, seed by seed: y [L, S] (S seeds' values at L settings x [L]) -> each seed's
  least-squares slope on x and the slopes' mean with its Student-t interval: {n, slope, ci_low,
  ci_high, per_seed, up, down} (a slope that rounds to 0.0 is neither up nor down)."""
  slopes = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 1)[0]
  lo, hi = t_interval(slopes, level)
  shown = np.round(slopes, 1)
  return {
    "n": len(slopes),
    "slope": float(np.mean(slopes)),
    "ci_low": lo,
    "ci_high": hi,
    "per_seed": [float(v) for v in slopes],
    "up": int(np.sum(shown > 0)),
    "down": int(np.sum(shown < 0)),
  }


def mcnemar(b: int, c: int) -> float:
  """Exact McNemar test of paired binary outcomes: b pairs where only the first is right, c where
  only the second is -> two-sided p-value (binomial, b of b + c at 1/2)."""
  from scipy import stats

  return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def problem_pairs(outcomes: dict, pairs: dict[str, str], level: float = 0.95) -> list[dict]:
  """Per pair {method: baseline} and mode, paired by problem over every (seed, problem):
  outcomes[(seed, model, mode)] = [0/1 per problem] (the same problems for every model of a
  seed). -> rows {method, baseline, mode, problems, b (method right, baseline wrong), c (the
  reverse), diff (pass@1 points), ci_low, ci_high (Wald, paired proportions), p (McNemar)}."""
  keys = {(m, mode) for _, m, mode in outcomes}
  rows = []
  for method, base in pairs.items():
    for mode in sorted({mode for m, mode in keys if m == method}):
      seeds = sorted(s for s, m, md in outcomes if m == method and md == mode)
      seeds = [s for s in seeds if (s, base, mode) in outcomes]
      if not seeds:
        continue
      a = np.concatenate([outcomes[(s, method, mode)] for s in seeds]).astype(bool)
      r = np.concatenate([outcomes[(s, base, mode)] for s in seeds]).astype(bool)
      b, c = int(np.sum(a & ~r)), int(np.sum(~a & r))
      row = {"method": method, "baseline": base, "mode": mode, "seeds": seeds}
      rows.append({**row, **problem_test(a.size, b, c, level)})
  return rows


def problem_test(n: int, b: int, c: int, level: float = 0.95) -> dict:
  """The paired-by-problem statistics of n pairs, b where only the method is right, c where only
  the baseline is (they depend on n, b, c alone, so pools of seeds add): {problems, b, c, diff
  (pass@1 points), ci_low, ci_high (Wald, paired proportions), p (McNemar's exact test)}."""
  from scipy import stats

  z = float(stats.norm.ppf(0.5 + level / 2))
  diff = (b - c) / n
  se = np.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
  return {
    "problems": n,
    "b": b,
    "c": c,
    "diff": 100 * diff,
    "ci_low": 100 * (diff - z * se),
    "ci_high": 100 * (diff + z * se),
    "p": mcnemar(b, c),
  }


def problem_pairs_text(rows: Sequence[dict]) -> str:
  """problem_pairs' rows (or problems.csv's) as a section of table.md."""
  body = [
    [
      f"{r['method']} − {r['baseline']}",
      r["mode"],
      r["problems"],
      f"{r['b']} / {r['c']}",
      f"{float(r['diff']):+.1f} [{float(r['ci_low']):+.1f}, {float(r['ci_high']):+.1f}]",
      f"{float(r['p']):.3f}",
    ]
    for r in rows
  ]
  head = ["pair", "pass@1", "problems", "only method / only baseline right", "difference [95% CI]"]
  return (
    "\nPaired by problem (every seed's held-out problems): pass@1 difference in points with a"
    " 95% Wald interval for paired proportions, and McNemar's exact test\n\n"
    f"{format_table([*head, 'McNemar p'], body)}\n"
  )


def aggregate(
  records: Sequence[dict],
  methods: Sequence[str],
  pairs: dict[str, str],
  level: float = 0.95,
  reps: int = 2000,
  seed: int = 0,
) -> tuple[list[dict], list[dict]]:
  """Across datasets, the rliable way (Agarwal et al., 2021): per method the interquartile mean
  of its scores over datasets × seeds, and per pair {method: baseline} the probability that the
  method scores above its baseline on a dataset, each with a stratified-bootstrap interval.

  Uses the datasets that hold every method in `methods` and, on them, the seeds every one of those
  cells has. Returns ([{method, iqm, ci_low, ci_high, datasets, seeds}], [{method, baseline,
  probability, ci_low, ci_high, datasets, seeds}]); ([], []) with fewer than two datasets or
  seeds."""
  cells: dict[tuple[str, str], dict[int, float]] = {}
  for r in records:
    if r.get("score") is not None:
      cells.setdefault((r["dataset"], r["method"]), {})[r["seed"]] = r["score"]
  datasets = _ordered([d for d, _ in cells], [])
  datasets = [d for d in datasets if all((d, m) in cells for m in methods)]
  if not datasets:
    return [], []
  seeds = sorted(set.intersection(*(set(cells[(d, m)]) for d in datasets for m in methods)))
  if len(datasets) < 2 or len(seeds) < 2:
    return [], []
  scores = {m: np.array([[cells[(d, m)][s] for d in datasets] for s in seeds]) for m in methods}
  saved = np.random.get_state()  # rliable draws some indices from numpy's global generator
  np.random.seed(seed)
  try:
    with warnings.catch_warnings():  # arch, inside rliable, deprecates the random_state it is given
      warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)
      iqm_rows, poi = _rliable(scores, pairs, level, reps, seed)
  finally:
    np.random.set_state(saved)
  size = {"datasets": len(datasets), "seeds": len(seeds)}
  iqm_rows = [dict(r, **size) for r in iqm_rows]
  return iqm_rows, [dict(r, **size) for r in poi]


def _rliable(scores: dict, pairs: dict, level: float, reps: int, seed: int):
  """rliable's interval estimates: IQM per method, probability of improvement per pair."""
  from rliable import library as rly
  from rliable import metrics

  rng = lambda: np.random.RandomState(seed)
  iqm = lambda x: np.array([metrics.aggregate_iqm(x)])
  point, ci = rly.get_interval_estimates(
    scores, iqm, reps=reps, confidence_interval_size=level, random_state=rng()
  )
  iqm_rows = [
    {
      "method": m,
      "iqm": float(point[m][0]),
      "ci_low": float(ci[m][0, 0]),
      "ci_high": float(ci[m][1, 0]),
    }
    for m in scores
  ]
  todo = {
    f"{m},{b}": (scores[m], scores[b]) for m, b in pairs.items() if m in scores and b in scores
  }
  if not todo:
    return iqm_rows, []
  point, ci = rly.get_interval_estimates(
    todo,
    metrics.probability_of_improvement,
    reps=reps,
    confidence_interval_size=level,
    random_state=rng(),
  )
  poi_rows = [
    {
      "method": k.split(",")[0],
      "baseline": k.split(",")[1],
      "probability": float(point[k]),
      "ci_low": float(np.ravel(ci[k])[0]),
      "ci_high": float(np.ravel(ci[k])[1]),
    }
    for k in todo
  ]
  return iqm_rows, poi_rows


def write_aggregate(path: str, iqm_rows: Sequence[dict], poi_rows: Sequence[dict]) -> None:
  """aggregate's two lists as one CSV, a row per statistic (AGGREGATE_COLUMNS)."""
  rows = [dict(r, statistic="iqm", value=r["iqm"]) for r in iqm_rows]
  rows += [
    dict(r, statistic="probability_of_improvement", value=r["probability"]) for r in poi_rows
  ]
  write_csv(path, rows, AGGREGATE_COLUMNS)


def weights_table(rows: Sequence[dict]) -> str:
  """Rows {dataset, method, n, WEIGHT_DIAGNOSTICS...} as the Markdown table of the weights."""
  body = [[r["dataset"], r["method"], r["n"], *diagnostics_text(r)] for r in rows]
  return format_table(["dataset", "method", "seeds", *DIAGNOSTICS_HEADER], body)


def aggregate_text(iqm_rows: Sequence[dict], poi_rows: Sequence[dict]) -> str:
  """The two aggregate tables as Markdown (empty when there are none)."""
  if not iqm_rows:
    return ""
  n = iqm_rows[0]
  head = f"over {n['datasets']} datasets × {n['seeds']} seeds, 95% stratified-bootstrap CIs"
  text = format_table(
    ["method", f"IQM ({head})"],
    [[r["method"], f"{r['iqm']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}]"] for r in iqm_rows],
  )
  if poi_rows:
    body = [
      [
        f"{r['method']} > {r['baseline']}",
        f"{r['probability']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
      ]
      for r in poi_rows
    ]
    text += "\n\n" + format_table(["pair", "probability of improvement"], body)
  return text


def paired_table(rows: Sequence[dict], datasets: Sequence[str] = ()) -> str:
  """Datasets as rows, one column per pair: "mean [ci_low, ci_high] (a/n up, b/n down)"."""
  cells = {(r["dataset"], r["method"], r["baseline"]): r for r in rows}
  pairs = list(dict.fromkeys((r["method"], r["baseline"]) for r in rows))
  body = [
    [d]
    + [
      f"{c['mean']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]"
      f" ({c['above']}/{c['n']} up, {c['below']}/{c['n']} down)"
      if (c := cells.get((d, m, b)))
      else "–"
      for m, b in pairs
    ]
    for d in _ordered([r["dataset"] for r in rows], list(datasets))
  ]
  return format_table(["dataset", *(f"{m} − {b}" for m, b in pairs)], body)


# averaged over fine-tuning, then (control) the final log-weights' Spearman ρ with return
WEIGHT_DIAGNOSTICS = ("iw/ess_fraction", "iw/max_weight", "iw/clip_fraction", "iw/mean_log_ratio")
WEIGHT_DIAGNOSTICS += ("final/spearman_log_ratio_return",)
DIAGNOSTICS_HEADER = ["ESS / batch", "max w", "clipped", "mean log q/π_ref", "ρ(final w, return)"]


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


def seeds_of(diagnostic: str) -> str:
  """The column of a merged weights.csv that counts the seeds one diagnostic is averaged over."""
  return f"{diagnostic} seeds"


def diagnostics_text(row: dict) -> list[str]:
  """The DIAGNOSTICS_HEADER cells of a row holding WEIGHT_DIAGNOSTICS ("–" where one is missing;
  "(k of n seeds)" after one averaged over fewer than the row's n seeds)."""
  formats = zip(WEIGHT_DIAGNOSTICS, ("{:.2f}", "{:.1f}", "{:.2f}", "{:.3f}", "{:+.2f}"))
  cells = []
  for k, f in formats:
    if row.get(k) is None:
      cells.append("–")
      continue
    k_seeds, n = row.get(seeds_of(k)), int(row.get("n", 0))
    fewer = k_seeds is not None and k_seeds < n
    cells.append(f.format(row[k]) + (f" ({k_seeds} of {n} seeds)" if fewer else ""))
  return cells


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
  if not np.isfinite(row["ci_low"]):
    return f"{row['mean']:.1f} (n = 1)"
  return f"{row['mean']:.1f} ± {row['std']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"


def read_csv(path: str) -> list[dict]:
  """The rows of a CSV file (write_csv's) as {column: text}; [] where the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


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
  ci = np.array([t_interval(table[:, j], level) for j in range(len(common))]).reshape(-1, 2)
  return common, table.mean(axis=0), ci[:, 0], ci[:, 1]
