"""experiments/report.py --merge: sweeps of one grid on other seeds joined into one table."""

import csv
import os
import subprocess
import sys

import numpy as np
from scipy import stats

from iwsft.io import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "report.py")
RNG = np.random.default_rng(0)
# per seed, per model, per pass@1 mode: 0/1 outcomes on 50 problems
OUTCOMES = {
  (s, m, mode): RNG.random(50) < p
  for s in range(3)
  for m, p in (("sft", 0.4), ("iw_sft", 0.45))
  for mode in ("greedy", "sampled")
}


def _sweep(d, seeds, ess, max_weight=None):
  """What a language sweep on `seeds` writes: cells, paired, problems and weights CSVs."""
  os.makedirs(d)
  cells = [
    {
      "dataset": f"pass@1 ({mode})",
      "method": m,
      "seed": s,
      "score": 100 * OUTCOMES[s, m, mode].mean(),
    }
    for s in seeds
    for m in ("sft", "iw_sft")
    for mode in ("greedy", "sampled")
  ]
  report.write_csv(os.path.join(d, "cells.csv"), cells, ["dataset", "method", "seed", "score"])
  recs = [dict(c) for c in cells]
  paired = report.paired_differences(recs, {"iw_sft": "sft"})
  report.write_csv(os.path.join(d, "paired.csv"), paired, report.PAIRED_COLUMNS)
  sub = {k: v for k, v in OUTCOMES.items() if k[0] in seeds}
  problems = report.problem_pairs(sub, {"iw_sft": "sft"})
  report.write_csv(os.path.join(d, "problems.csv"), problems, report.PROBLEM_COLUMNS)
  weights = {"dataset": "chat", "method": "iw_sft", "n": len(seeds), "iw/ess_fraction": ess}
  if max_weight is not None:  # a diagnostic that only some sweeps record
    weights["iw/max_weight"] = max_weight
  weights["seeds"] = seeds
  report.write_csv(os.path.join(d, "weights.csv"), [weights], list(weights))


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_merged_sweeps_give_the_tables_of_all_their_seeds(tmp_path):
  _sweep(tmp_path / "a", [0], ess=0.6)
  _sweep(tmp_path / "b", [1, 2], ess=0.9)
  out = tmp_path / "all"
  r = _run(f"--dir={out}", f"--merge={tmp_path / 'a'},{tmp_path / 'b'}", "--write")
  assert r.returncode == 0, r.stderr[-2000:]
  # pass@1 per cell over the three seeds: mean and Student-t interval from numpy / scipy
  table = {(row["dataset"], row["method"]): row for row in _read(out / "table.csv")}
  x = [100 * OUTCOMES[s, "iw_sft", "greedy"].mean() for s in range(3)]
  row = table["pass@1 (greedy)", "iw_sft"]
  half = stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / np.sqrt(3)
  np.testing.assert_allclose(float(row["mean"]), np.mean(x), rtol=1e-12)
  np.testing.assert_allclose(float(row["ci_high"]), np.mean(x) + half, rtol=1e-9)
  # paired by seed over the three seeds
  paired = {row["dataset"]: row for row in _read(out / "paired.csv")}
  d = [
    100 * (OUTCOMES[s, "iw_sft", "sampled"].mean() - OUTCOMES[s, "sft", "sampled"].mean())
    for s in range(3)
  ]
  assert int(paired["pass@1 (sampled)"]["n"]) == 3
  np.testing.assert_allclose(float(paired["pass@1 (sampled)"]["mean"]), np.mean(d), atol=1e-9)
  # paired by problem: McNemar over the 150 stacked pairs, counted here directly
  got = {row["mode"]: row for row in _read(out / "problems.csv")}["greedy"]
  a = np.concatenate([OUTCOMES[s, "iw_sft", "greedy"] for s in range(3)])
  base = np.concatenate([OUTCOMES[s, "sft", "greedy"] for s in range(3)])
  b, c = int(np.sum(a & ~base)), int(np.sum(~a & base))
  assert (int(got["problems"]), int(got["b"]), int(got["c"])) == (150, b, c)
  assert got["seeds"] == "0;1;2"
  np.testing.assert_allclose(float(got["p"]), stats.binomtest(b, b + c, 0.5).pvalue, rtol=1e-9)
  np.testing.assert_allclose(float(got["diff"]), 100 * (a.mean() - base.mean()), atol=1e-9)
  # weight diagnostics: the mean over the three seeds
  w = _read(out / "weights.csv")[0]
  np.testing.assert_allclose(float(w["iw/ess_fraction"]), (0.6 + 2 * 0.9) / 3)
  assert "Paired by problem" in (out / "table.md").read_text()


def test_a_diagnostic_one_merged_sweep_lacks_is_averaged_and_labelled_over_the_others(tmp_path):
  _sweep(tmp_path / "a", [0], ess=0.6)
  _sweep(tmp_path / "b", [1, 2], ess=0.9, max_weight=3.0)
  out = tmp_path / "all"
  r = _run(f"--dir={out}", f"--merge={tmp_path / 'a'},{tmp_path / 'b'}", "--write")
  assert r.returncode == 0, r.stderr[-2000:]
  (w,) = _read(out / "weights.csv")
  assert (w["n"], w["iw/ess_fraction seeds"], w["iw/max_weight seeds"]) == ("3", "3", "2")
  np.testing.assert_allclose(float(w["iw/max_weight"]), 3.0)
  (line,) = [x for x in (out / "table.md").read_text().splitlines() if x.startswith("| chat")]
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[3:5] == ["0.80", "3.0 (2 of 3 seeds)"], cells


def test_a_seed_in_two_merged_sweeps_is_one_line_exit_2(tmp_path):
  _sweep(tmp_path / "a", [0, 1], ess=0.6)
  _sweep(tmp_path / "b", [1], ess=0.9)
  r = _run(f"--dir={tmp_path / 'all'}", f"--merge={tmp_path / 'a'},{tmp_path / 'b'}")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "is in two of the sweeps" in lines[0], r.stderr
  assert not os.path.exists(tmp_path / "all")


LENGTHS = (1, 2, 5)
ABLATION_SEEDS = (3, 4, 5, 6)
LENGTH_RUNS = [("bc", "bc", "π_ref", "", None)] + [
  (f"{m}{'' if k == 1 else f' x{k}'}", m, ablates, base, k)
  for k in LENGTHS
  for m, ablates, base in (("filtered_bc", "baseline", ""), ("iw_sft", "fine-tuning length", "x"))
]
# per run and seed: a score (the weighted runs drift up with length) and log θ/π_ref at the end
ABLATION_SCORES = {
  (run, s): (20 + (k or 0) * (m == "iw_sft") + RNG.normal(0, 2), RNG.random())
  for run, m, _, _, k in LENGTH_RUNS
  for s in ABLATION_SEEDS
}


def _ablation_piece(d, lengths, bc_shift=0.0, scale=1.0):
  """What experiments/ablations.py --family=length --weighted=iw_sft --lengths=... writes and
  the join reads: ablations.csv (as written before it had a method column) and cells.csv.
  bc_shift: another π_ref (its returns and scores move); scale: the same runs normalised by
  other reference scores (the scores move, the returns do not)."""
  os.makedirs(d)
  runs = [r for r in LENGTH_RUNS if r[4] is None or r[4] in lengths]
  table, cells = [], []
  for run, _, ablates, base, k in runs:
    base = "" if not base else "filtered_bc" + ("" if k == 1 else f" x{k}")
    table.append({"run": run, "ablates": ablates, "length": k or "", "baseline": base})
    if base:
      table[-1]["iw/ess_fraction"] = 0.5 + 0.01 * k
    for s in ABLATION_SEEDS:
      score, moved = ABLATION_SCORES[run, s]
      cells.append(
        {
          "dataset": "hop",
          "method": run,
          "seed": s,
          "score": scale * (score + bc_shift * (run == "bc")),
          "return_mean": 10 * (score + bc_shift * (run == "bc")),
          "cell": f"{run}/seed_{s}",
          "divergence": "" if run == "bc" else moved,
        }
      )
  report.write_csv(os.path.join(d, "ablations.csv"), table, list(table[-1]))
  report.write_csv(os.path.join(d, "cells.csv"), cells, list(cells[0]))


def _join_pieces(tmp_path, **long):
  """Joins a 1×/2× piece and a 5× piece (`long`: _ablation_piece's options) into tmp_path/all."""
  _ablation_piece(tmp_path / "short", (1, 2))
  _ablation_piece(tmp_path / "long", (5,), **long)
  out = tmp_path / "all"
  return out, _run(
    f"--dir={out}", "--ablation", f"--merge={tmp_path / 'short'},{tmp_path / 'long'}"
  )


def test_pieces_of_a_length_ablation_join_into_its_table_and_trend(tmp_path):
  out, r = _join_pieces(tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {row["run"]: row for row in _read(out / "ablations.csv")}
  assert list(rows) == [run for run, *_ in LENGTH_RUNS]
  score = lambda run: np.array([ABLATION_SCORES[run, s][0] for s in ABLATION_SEEDS])
  gains = np.stack(
    [score(f"iw_sft{t}") - score(f"filtered_bc{t}") for t in ("", " x2", " x5")]
  )  # [lengths, seeds]
  row = rows["iw_sft x5"]
  half = stats.t.ppf(0.975, 3) * gains[2].std(ddof=1) / 2
  np.testing.assert_allclose(float(row["diff"]), gains[2].mean(), atol=1e-9)
  np.testing.assert_allclose(float(row["diff_high"]), gains[2].mean() + half, atol=1e-9)
  assert (row["method"], row["length"], row["iw/ess_fraction"]) == ("iw_sft", "5.0", "0.55")
  # the pieces label every weighted run by its length, as older files did; 1× is the recipe
  assert [rows[r]["ablates"] for r in ("iw_sft", "iw_sft x2")] == ["recipe", "fine-tuning length"]
  moved = [ABLATION_SCORES["filtered_bc x2", s][1] for s in ABLATION_SEEDS]
  np.testing.assert_allclose(float(rows["filtered_bc x2"]["divergence"]), np.mean(moved))
  # the trend: each seed's least-squares slope on log10(length), then their mean
  slopes = [np.polyfit(np.log10(LENGTHS), gains[:, i], 1)[0] for i in range(len(ABLATION_SEEDS))]
  (line,) = [x for x in (out / "table.md").read_text().splitlines() if " 1× / 2× / 5× " in x]
  assert f"{np.mean(slopes):+.1f} [" in line
  assert (out / "length.png").stat().st_size > 10_000
  assert len(_read(out / "cells.csv")) == len(ABLATION_SEEDS) * len(LENGTH_RUNS)  # bc once
  assert "normalised scores differ" not in (out / "table.md").read_text()


def test_pieces_normalised_by_other_reference_scores_join_and_say_how_far_apart(tmp_path):
  out, r = _join_pieces(tmp_path, scale=1.001)
  assert r.returncode == 0, r.stderr[-2000:]
  apart = max(0.001 * abs(ABLATION_SCORES["bc", s][0]) for s in ABLATION_SEEDS)
  first = (out / "table.md").read_text().splitlines()[0]
  assert f"normalised scores differ by up to {apart:.1e}" in first, first


def test_pieces_with_another_pi_ref_are_refused_in_one_line(tmp_path):
  out, r = _join_pieces(tmp_path, bc_shift=0.5)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "do not share π_ref" in lines[0], r.stderr
  assert not os.path.exists(out)


def test_an_ablation_reprinted_from_its_csv_pairs_by_seed_id_with_t_intervals(tmp_path):
  out, r = _join_pieces(tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  table = _read(out / "ablations.csv")
  older = tmp_path / "older"  # a file before the seeds and method columns: seeds by position
  os.makedirs(older)
  plain = [{k: v for k, v in row.items() if k not in ("seeds", "method")} for row in table]
  report.write_csv(older / "ablations.csv", plain, list(plain[0]))
  for row in table:  # one run's seeds in another order: pairing must follow the seed ids
    if row["run"] == "iw_sft x5":
      row["seeds"] = ";".join(row["seeds"].split(";")[::-1])
      row["per_seed"] = ";".join(row["per_seed"].split(";")[::-1])
  report.write_csv(out / "ablations.csv", table, list(table[0]))
  score = lambda run: np.array([ABLATION_SCORES[run, s][0] for s in ABLATION_SEEDS])
  gain = score("iw_sft x5") - score("filtered_bc x5")
  lo, hi = stats.t.interval(0.95, len(gain) - 1, gain.mean(), stats.sem(gain))
  x = score("iw_sft x5")
  x_lo, x_hi = stats.t.interval(0.95, len(x) - 1, x.mean(), stats.sem(x))
  for d in (out, older):
    r = _run(f"--dir={d}", "--ablation")
    assert r.returncode == 0, r.stderr[-2000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("| iw_sft x5 |")]
    assert f"{gain.mean():+.1f} [{lo:+.1f}, {hi:+.1f}] − filtered_bc x5" in line, line
    assert f"{x.mean():.1f} ± {x.std(ddof=1):.1f} [{x_lo:.1f}, {x_hi:.1f}]" in line, line
    assert " 1× / 2× / 5× " in r.stdout  # the length trend, as the ablation printed it
  assert not os.path.exists(older / "table.md")  # a reprint writes nothing
