"""Sweeps: the aggregation against numpy and closed forms, and an interrupted sweep that resumes,
skips finished cells and ends in the tables and plots."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from conftest import EXPERT, LM_TINY, MIXED, control_flags
from scipy import stats

from iwsft import sweep as sweep_lib
from iwsft.io import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "experiments", "sweep.py")
TINY = control_flags()


# Two-sided 95% Student-t quantiles t_{0.975, n-1}, from printed tables (not from scipy).
T975 = {2: 12.706204736174707, 3: 4.302652729911275, 5: 2.7764451051977987}


def test_t_interval_against_the_tabulated_quantiles():
  for n, t in T975.items():
    x = np.arange(n, dtype=np.float64) ** 1.5
    half = t * x.std(ddof=1) / np.sqrt(n)
    np.testing.assert_allclose(report.t_interval(x), (x.mean() - half, x.mean() + half), rtol=1e-9)
  assert all(np.isnan(report.t_interval([7.5])))
  lo, hi = report.t_interval([35.6, 38.7, 46.2])  # the demo's bc seeds: past their range
  assert lo < 35.6 and hi > 46.2


@pytest.mark.parametrize("n", [3, 5, 10])
def test_t_interval_covers_a_normal_mean_95_percent_of_the_time(n):
  """Coverage by simulation: 10,000 samples of n normal values; the interval holds the true mean
  95% ± 1% of the time (the simulation's own s.e. is 0.22%). A percentile bootstrap of the mean
  covers about 76% at n = 3."""
  x = np.random.default_rng(n).normal(3.0, 2.0, (10_000, n))
  covered = np.mean([lo <= 3.0 <= hi for lo, hi in map(report.t_interval, x)])
  assert abs(covered - 0.95) < 0.01, covered


def test_paired_slopes_are_each_seeds_regression_slope_with_a_t_interval():
  """Against scipy's linregress seed by seed and scipy's t quantile; a slope of exactly zero
  counts as neither up nor down."""
  x = np.log10([1.0, 2.0, 5.0, 10.0])
  rng = np.random.default_rng(1)
  y = 3.0 * x[:, None] + rng.normal(0, 1, (4, 6))  # 6 seeds
  y[:, 5] = 7.0  # a flat seed
  got = report.paired_slopes(x, y)
  slopes = np.array([stats.linregress(x, y[:, s]).slope for s in range(6)])
  half = stats.t.ppf(0.975, 5) * slopes.std(ddof=1) / np.sqrt(6)
  np.testing.assert_allclose(got["per_seed"], slopes, atol=1e-9)
  np.testing.assert_allclose(
    [got["ci_low"], got["ci_high"]], [slopes.mean() - half, slopes.mean() + half]
  )
  up = int(np.sum(np.round(slopes, 1) > 0))
  assert (got["n"], got["up"], got["down"]) == (6, up, 5 - up)


def test_mcnemar_against_the_binomial_closed_form():
  """b = 10, c = 2: p = 2 · Σ_{k≤2} C(12, k) / 2^12; no discordant pairs: p = 1."""
  np.testing.assert_allclose(report.mcnemar(10, 2), 2 * (1 + 12 + 66) / 4096, rtol=1e-12)
  np.testing.assert_allclose(report.mcnemar(2, 10), 2 * (1 + 12 + 66) / 4096, rtol=1e-12)
  assert report.mcnemar(0, 0) == 1.0 and report.mcnemar(3, 3) == 1.0


def test_aggregate_iqm_and_probability_of_improvement_against_numpy():
  """rliable's IQM and probability of improvement on a grid whose values are known exactly."""
  rng = np.random.default_rng(0)
  datasets, seeds = ["a", "b", "c"], range(8)
  base = {d: rng.normal(0, 1, 8) for d in datasets}
  recs = [
    {"dataset": d, "method": m, "seed": s, "score": base[d][s] + shift}
    for d in datasets
    for m, shift in (("filtered_bc", 0.0), ("iw_sft", 100.0))
    for s in seeds
  ]
  iqm, poi = report.aggregate(recs, ["filtered_bc", "iw_sft"], {"iw_sft": "filtered_bc"}, reps=200)
  x = np.sort(np.concatenate([base[d] for d in datasets]))  # 24 values: the middle 12
  want = x[6:18].mean()
  got = {r["method"]: r for r in iqm}
  np.testing.assert_allclose(got["filtered_bc"]["iqm"], want, rtol=1e-9)
  np.testing.assert_allclose(got["iw_sft"]["iqm"], want + 100.0, rtol=1e-9)
  assert got["iw_sft"]["ci_low"] <= got["iw_sft"]["iqm"] <= got["iw_sft"]["ci_high"]
  (p,) = poi
  assert p["probability"] == 1.0 and p["ci_low"] == 1.0  # every score above every baseline's
  assert (p["datasets"], p["seeds"]) == (3, 8)
  assert report.aggregate(recs[:16], ["filtered_bc", "iw_sft"], {}) == ([], [])  # one dataset
  again = report.aggregate(recs, ["filtered_bc", "iw_sft"], {"iw_sft": "filtered_bc"}, reps=200)
  assert again == (iqm, poi)  # seeded: the same intervals every time


def test_summary_and_table_against_numpy():
  rng = np.random.default_rng(0)
  recs = [
    {"dataset": d, "method": m, "seed": s, "score": float(rng.normal(10 * i + j, 3))}
    for i, d in enumerate(["hopper-medium", "hopper-medium-replay"])
    for j, m in enumerate(["bc", "iw_sft"])
    for s in range(5)
  ]
  recs.append(
    {"dataset": "hopper-medium", "method": "bc", "seed": 9, "score": None}
  )  # no reference scores
  summary = report.summarise(recs)
  assert [(r["dataset"], r["method"]) for r in summary] == [
    ("hopper-medium", "bc"),
    ("hopper-medium", "iw_sft"),
    ("hopper-medium-replay", "bc"),
    ("hopper-medium-replay", "iw_sft"),
  ]
  for row in summary:
    x = np.array(
      [
        r["score"]
        for r in recs
        if r["dataset"] == row["dataset"]
        and r["method"] == row["method"]
        and r["score"] is not None
      ]
    )
    assert row["n"] == 5 and row["seeds"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([row["mean"], row["std"]], [x.mean(), x.std(ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(
      [row["ci_low"], row["ci_high"]],
      x.mean() + np.array([-1, 1]) * T975[5] * x.std(ddof=1) / np.sqrt(5),
      rtol=1e-9,
    )
  table = report.markdown_table(summary, methods=["iw_sft", "bc"]).splitlines()
  assert table[0] == "| dataset | iw_sft | bc |" and len(table) == 5
  bc_means = [r["mean"] for r in summary if r["method"] == "bc"]
  assert table[-1].split("|")[3].strip() == f"{np.mean(bc_means):.1f}"
  first = summary[0]
  assert (
    f"{first['mean']:.1f} ± {first['std']:.1f} [{first['ci_low']:.1f}, {first['ci_high']:.1f}]"
    in table[2]
  )


def test_paired_differences_against_numpy():
  """Per seed, weighted − unweighted on the seeds both have; a seed's shared spread cancels."""
  rng = np.random.default_rng(2)
  base = rng.normal(20.0, 10.0, 5)  # a large spread over seeds, shared by both methods
  shift = rng.normal(3.0, 1.0, 5)
  recs = [{"dataset": "d", "method": "filtered_bc", "seed": s, "score": base[s]} for s in range(5)]
  recs += [
    {"dataset": "d", "method": "iw_sft", "seed": s, "score": base[s] + shift[s]}
    for s in (3, 1, 0, 2)  # out of order; seed 4 has no iw_sft cell, so it is not paired
  ]
  recs += [
    {"dataset": "d", "method": "bc", "seed": 0, "score": 1.0},  # in no pair
    {"dataset": "d", "method": "iw_sft_q", "seed": 0, "score": 5.0},  # its baseline is missing
  ]
  rows = report.paired_differences(recs, {"iw_sft": "filtered_bc", "iw_sft_q": "sft_q"})
  assert len(rows) == 1
  row, d = rows[0], shift[:4]
  assert (row["dataset"], row["method"], row["baseline"]) == ("d", "iw_sft", "filtered_bc")
  assert (
    row["seeds"] == [0, 1, 2, 3] and row["n"] == 4 and row["above"] == int((d.round(1) > 0).sum())
  )
  np.testing.assert_allclose(row["per_seed"], d, rtol=1e-12)
  np.testing.assert_allclose([row["mean"], row["std"]], [d.mean(), d.std(ddof=1)], rtol=1e-12)
  half = 3.182446305284263 * d.std(ddof=1) / 2  # t_{0.975, 3}, four seeds
  np.testing.assert_allclose([row["ci_low"], row["ci_high"]], [d.mean() - half, d.mean() + half])
  unpaired = report.summarise(recs)
  width = lambda r: r["ci_high"] - r["ci_low"]
  assert width(row) < min(width(r) for r in unpaired if r["method"] in ("iw_sft", "filtered_bc"))
  # two seeds, differences 0 and 10: mean 5, std √50, the t-interval 5 ± 12.706 · 5
  two = [
    {"dataset": "d", "method": m, "seed": s, "score": x}
    for m, xs in (("filtered_bc", (5.0, 5.0)), ("iw_sft", (5.0, 15.0)))
    for s, x in enumerate(xs)
  ]
  (row,) = report.paired_differences(two, {"iw_sft": "filtered_bc"})
  np.testing.assert_allclose([row["ci_low"], row["ci_high"]], [5 - 5 * T975[2], 5 + 5 * T975[2]])
  assert row["above"] == 1
  table = report.paired_table([row]).splitlines()
  assert table[0] == "| dataset | iw_sft − filtered_bc |"
  assert table[2] == "| d | +5.0 [-58.5, +68.5] (1/2 up, 0/2 down) |"
  # a difference that rounds to 0.0 at the tables' precision is neither up nor down
  noise = [dict(r, score=r["score"] + 1e-6 * (r["method"] == "iw_sft")) for r in two[:1] + two[2:3]]
  (row,) = report.paired_differences(noise, {"iw_sft": "filtered_bc"})
  assert (row["n"], row["above"], row["below"]) == (1, 0, 0)


def test_curve_band_uses_the_steps_every_seed_has():
  steps, mean, lo, hi = report.curve_band([([0, 10, 20], [1.0, 2.0, 3.0]), ([0, 10], [3.0, 4.0])])
  assert steps == [0, 10]
  chex.assert_trees_all_close(mean, np.array([2.0, 3.0]))
  assert np.all(lo <= mean) and np.all(mean <= hi)


def sweep(work, *extra):
  return [
    sys.executable,
    CLI,
    f"--workdir={work}",
    f"--datasets={MIXED},{EXPERT}",
    "--methods=bc,iw_sft",
    "--seeds=0,1",
    *TINY,
    *extra,
  ]


class _RecordsOnly:
  """A grid whose cells exist only as records (no files): what the engine may read of a cell."""

  cfg = type("Cfg", (), {"pipeline": "test", "log": type("Log", (), {"wandb_group": "g"})()})()
  methods, datasets, seeds = ["filtered_bc", "iw_sft"], ["d1", "d2"], [0, 1, 2]
  pairs, controls, score_label = {"iw_sft": "filtered_bc"}, {}, "score"
  across_datasets = True

  def __init__(self, workdir):
    self.recs = [
      sweep_lib.CellRecord(
        dataset=d,
        method=m,
        seed=s,
        score=10.0 * i + s + (m == "iw_sft"),
        cell=os.path.join(workdir, "nowhere"),
        weights={"iw/ess_fraction": 0.1 * (s + 1), "iw/max_weight": 2.0} if m == "iw_sft" else None,
      )
      for i, d in enumerate(self.datasets)
      for m in self.methods
      for s in self.seeds
    ]

  validate = prepare = lambda self: None
  identity = lambda self: {"grid": "records only"}
  plan = lambda self, workdir: []
  keys = lambda self: [0]
  records = lambda self, workdir: self.recs
  training_data = staticmethod(lambda d: d)
  extra_tables = lambda self, recs, workdir: ("", [])
  figures = lambda self, recs, workdir: []


def test_the_engine_writes_its_tables_from_the_records_alone(tmp_path):
  """Scores, paired differences and the weights' table come from the pipeline's records; no cell
  directory exists to be read."""
  grid = _RecordsOnly(str(tmp_path))
  sweep_lib.run_sweep(grid, str(tmp_path), say=lambda *_: None)
  cells = list(csv.DictReader(open(tmp_path / "cells.csv")))
  assert len(cells) == 12 and {c["cell"] for c in cells} == {"nowhere"}
  paired = {r["dataset"]: r for r in csv.DictReader(open(tmp_path / "paired.csv"))}
  assert float(paired["d1"]["mean"]) == float(paired["d2"]["mean"]) == 1.0
  weights = {r["dataset"]: r for r in csv.DictReader(open(tmp_path / "weights.csv"))}
  np.testing.assert_allclose(float(weights["d2"]["iw/ess_fraction"]), 0.2)  # mean of .1, .2, .3
  assert weights["d1"]["n"] == "3" and float(weights["d1"]["iw/max_weight"]) == 2.0


def test_an_interrupted_sweep_resumes_and_skips_finished_cells(datasets, tmp_path):
  work = tmp_path / "sweep"
  proc = subprocess.Popen(
    sweep(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
  )
  first = work / MIXED.replace("/", "__") / "bc" / "group_0-1" / "seed_1" / "result.json"
  t0 = time.time()
  while not first.exists():  # stop the sweep once its first group has finished
    assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode in (0, 75, -signal.SIGTERM), err[-2000:]  # 75: stopped inside a run
  stamp = first.stat().st_mtime_ns
  r = subprocess.run(sweep(work), capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "3 run(s) to do" in r.stdout or "4 run(s) to do" in r.stdout
  assert first.stat().st_mtime_ns == stamp  # the finished cell was not rerun
  rows = list(csv.DictReader(open(work / "cells.csv")))
  assert len(rows) == 8 and {(r["method"], r["seed"]) for r in rows} == {
    (m, s) for m in ("bc", "iw_sft") for s in ("0", "1")
  }
  assert all(r["seeds_trained_together"] == "2" for r in rows)
  assert all((work / r["cell"] / "result.json").exists() for r in rows)  # relative to the workdir
  assert not any(os.path.isabs(r["cell"]) for r in rows)
  summary = list(csv.DictReader(open(work / "table.csv")))
  assert len(summary) == 4 and all(r["n"] == "2" for r in summary)
  assert (work / "curves.png").stat().st_size > 10_000 and (
    work / "bounds.png"
  ).stat().st_size > 10_000
  table_md = (work / "table.md").read_text()
  assert "| dataset | bc | iw_sft |" in table_md
  assert "| dataset | iw_sft − filtered_bc |" not in table_md  # filtered_bc was not in the grid
  assert not (work / "paired.csv").exists()
  # the header names the config file at its default preset, then the overrides
  assert (
    "(control sweep, iwsft/control/config.py:cpu-sweep --config.policy.hidden=32,32 " in table_md
  )
  info = json.loads((work / "sweep.json").read_text())
  assert info["cells"] == 8
  # the weights' diagnostics: per seed over iw_sft's train rows, then over seeds
  weights = list(csv.DictReader(open(work / "weights.csv")))
  assert [(w["dataset"], w["method"], w["n"]) for w in weights] == [
    (d, "iw_sft", "2") for d in (MIXED, EXPERT)
  ]
  for w in weights:
    for key in ("iw/ess_fraction", "iw/max_weight", "iw/clip_fraction", "iw/mean_log_ratio"):
      want = np.mean([_train_mean(work, w["dataset"], s, key) for s in (0, 1)])
      np.testing.assert_allclose(float(w[key]), want, rtol=1e-9)
    assert 0 < float(w["iw/ess_fraction"]) <= 1 and float(w["iw/max_weight"]) >= 1
  assert "| dataset | method | seeds | ESS / batch | max w | clipped |" in table_md
  # Nothing left to do; and other settings in the same workdir are refused, changing nothing.
  r = subprocess.run(
    sweep(work, "--dry_run"), capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert r.returncode == 0 and "0 run(s) to do" in r.stdout
  r = subprocess.run(
    sweep(work, "--config.finetune.learning_rate=0.5"),
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert (
    r.returncode == 2 and "other settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  )
  assert first.stat().st_mtime_ns == stamp
  # Bad settings are refused before the workdir is touched, even with --overwrite and --dry_run;
  # a dry run with other (valid) settings says so instead of "all cells finished".
  before = _tree(work)
  for extra in (["--overwrite"], ["--dry_run"]):
    for bad in ("--config.finetune.warmup_steps=100000", "--config.curation.percentiles=(90,120)"):
      r = subprocess.run(sweep(work, bad, *extra), capture_output=True, text=True, cwd=ROOT)
      assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-1000:]
  r = subprocess.run(
    sweep(work, "--dry_run", "--config.finetune.learning_rate=0.5"),
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert r.returncode == 0 and "other settings" in r.stdout and "--overwrite" in r.stdout
  assert _tree(work) == before


def test_two_processes_split_a_grid_and_write_one_table(datasets, tmp_path):
  """--part 0 and 1 of --parts 2, run at once in one workdir: each runs its half of the (dataset,
  seed) groups, no cell twice, and the tables hold every cell."""
  work = tmp_path / "sweep"
  args = lambda i: sweep(work, "--seeds_per_group=1", f"--part={i}", "--parts=2")
  procs = [
    subprocess.Popen(args(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for i in (0, 1)
  ]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert "4 run(s) to do" in out  # 2 datasets x 2 methods, one seed each
  for d in (MIXED, EXPERT):  # one π_ref per seed: each group's reference trained by its part
    refs = {p.name for p in (work / d.replace("/", "__")).glob("reference_*")}
    assert refs == {"reference_0", "reference_1"}
  ran = [
    set(line.split("seeds ")[-1] for line in out.splitlines() if line.startswith("["))
    for out, _ in outs
  ]
  assert ran == [{"0"}, {"1"}]  # part 0 ran seed 0's groups, part 1 seed 1's
  assert sum("table" in out or "| dataset |" in out for out, _ in outs) >= 1
  rows = list(csv.DictReader(open(work / "cells.csv")))
  assert sorted((r["dataset"], r["method"], r["seed"]) for r in rows) == sorted(
    (d, m, s) for d in (MIXED, EXPERT) for m in ("bc", "iw_sft") for s in ("0", "1")
  )
  assert len(list(csv.DictReader(open(work / "table.csv")))) == 4
  r = subprocess.run(
    sweep(work, "--part=0", "--parts=2", "--overwrite"), capture_output=True, text=True, cwd=ROOT
  )
  assert r.returncode == 2 and "--parts" in r.stderr


def _tree(root):
  """{relative path: (size, mtime_ns)} of every file under root."""
  return {
    os.path.relpath(os.path.join(d, f), root): (
      os.stat(os.path.join(d, f)).st_size,
      os.stat(os.path.join(d, f)).st_mtime_ns,
    )
    for d, _, files in os.walk(root)
    for f in files
  }


def _train_mean(work, dataset, seed, key):
  """A seed's iw_sft train rows' mean of key, read from its metrics.jsonl."""
  (path,) = glob.glob(
    str(work / dataset.replace("/", "__") / "iw_sft" / "group_*" / f"seed_{seed}" / "metrics.jsonl")
  )
  rows = [json.loads(line) for line in open(path)]
  return np.mean([r[key] for r in rows if r["kind"] == "train" and r["stage"] == "iw_sft"])


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--config.stepz=3"], "stepz"),
    (["--config.finetune.steps=many"], "invalid literal for int()"),
    (["--config=iwsft/control/config.py:gpu"], "unknown control preset"),
    (["--methods=ppo"], "unknown"),
    (["--seeds=0,0"], "distinct"),
    (["--datasets=huge"], "unknown kinds"),
    (["--dataset_configs=configs/control/nowhere.py"], "does not exist"),
    (["--dataset_configs=iwsft/lm/config.py"], "not a control config"),
  ],
)
def test_bad_sweep_input_is_one_line_exit_2(datasets, tmp_path, args, needle):
  r = subprocess.run(
    [sys.executable, CLI, f"--workdir={tmp_path / 'w'}", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert r.returncode == 2 and needle in r.stderr, r.stderr[-1000:]
  assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_per_dataset_config_file_sets_its_cells(datasets, tmp_path):
  """--dataset_configs: the file names the dataset and its settings; its cells are trained with
  them (here 30 reference updates and 16 hidden units, not the sweep's --config)."""
  conf = tmp_path / "mixed.py"
  conf.write_text(
    "from iwsft.control.config import dataset_recipe\n\n\n"
    "def get_config(preset='cpu-sweep'):\n"
    f"  c = dataset_recipe({MIXED!r}, preset)\n"
    "  c.policy.hidden = (16,)\n"
    "  c.reference.update(steps=30, batch_size=8)\n"
    "  c.eval.update(every=0, final_episodes=2)\n"
    "  return c\n"
  )
  work = tmp_path / "sweep"
  r = subprocess.run(
    [sys.executable, CLI, f"--workdir={work}", f"--dataset_configs={conf}", "--methods=bc"]
    + ["--seeds=0"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  results = glob.glob(str(work / MIXED.replace("/", "__") / "bc" / "*" / "seed_0" / "result.json"))
  assert len(results) == 1
  config = json.loads(open(results[0]).read())["config"]
  assert config["dataset"] == MIXED and config["reference"]["steps"] == 30
  assert config["policy"]["hidden"] == [16]
  assert "| dataset | bc |" in (work / "table.md").read_text()


def test_the_shipped_configs_load_and_name_their_datasets():
  from iwsft import datasets
  from iwsft.control.config import load_file

  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "control", "*.py"))):
    name = os.path.basename(path).removesuffix(".py")
    env, _, kind = name.partition("_")
    profile = "small" if kind.startswith("small_") else "full"
    kind = kind.removeprefix("small_").replace("_", "-")
    c = load_file(path)
    assert c.dataset == datasets.dataset_id(env, profile, kind), path
    assert load_file(path + ":cpu").finetune.batch_size == 32


def test_the_language_pipeline_runs_through_the_same_sweep(tmp_path):
  work = tmp_path / "lm"
  cmd = [
    sys.executable,
    CLI,
    "--config=iwsft/lm/config.py",
    f"--workdir={work}",
    "--seeds=0,1",
    "--methods=sft,iw_sft",
    *LM_TINY,
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  results = [json.loads((work / f"seed_{s}" / "result.json").read_text()) for s in (0, 1)]
  summary = {
    (row["dataset"], row["method"]): row for row in csv.DictReader(open(work / "table.csv"))
  }
  assert set(m for _, m in summary) == {"reference", "sft", "iw_sft"}
  for mode in ("greedy", "sampled"):
    for model in ("reference", "sft", "iw_sft"):
      x = np.array([100 * res["models"][model][f"pass@1_{mode}"] for res in results])
      row = summary[(f"addition pass@1 ({mode})", model)]
      np.testing.assert_allclose(float(row["mean"]), x.mean(), rtol=1e-9, atol=1e-9)
      np.testing.assert_allclose(float(row["std"]), x.std(ddof=1), rtol=1e-9, atol=1e-9)
  # iw_sft against sft, seed by seed, from the results themselves
  paired = {row["dataset"]: row for row in csv.DictReader(open(work / "paired.csv"))}
  for mode in ("greedy", "sampled"):
    k = f"pass@1_{mode}"
    d = np.array(
      [100 * res["models"]["iw_sft"][k] - 100 * res["models"]["sft"][k] for res in results]
    )
    row = paired[f"addition pass@1 ({mode})"]
    assert (row["method"], row["baseline"], row["n"]) == ("iw_sft", "sft", "2")
    np.testing.assert_allclose(float(row["mean"]), d.mean(), rtol=1e-9, atol=1e-9)
    assert int(row["above"]) == int((d.round(1) > 0).sum())
    assert int(row["below"]) == int((d.round(1) < 0).sum())
  assert "| dataset | iw_sft − sft |" in (work / "table.md").read_text()
  # one row of weights per weighted method, of its training runs, not per pass@1 mode
  (weights,) = list(csv.DictReader(open(work / "weights.csv")))
  assert (weights["dataset"], weights["method"], weights["n"]) == ("addition", "iw_sft", "2")
  ess = []
  for s in (0, 1):
    rows = [json.loads(line) for line in open(work / f"seed_{s}" / "metrics.jsonl")]
    ess.append(
      np.mean(
        [r["iw/ess_fraction"] for r in rows if r["kind"] == "train" and r["stage"] == "iw_sft"]
      )
    )
  np.testing.assert_allclose(float(weights["iw/ess_fraction"]), np.mean(ess), rtol=1e-9)
  assert (work / "paired.png").stat().st_size > 10_000
  assert (work / "weights.png").stat().st_size > 10_000
  # paired by problem: the discordant counts from the saved per-problem outcomes, read with json
  assert not (work / "aggregate.csv").exists()  # greedy and sampled are not two tasks to pool
  assert "rliable" not in (work / "table.md").read_text()
  problems = {row["mode"]: row for row in csv.DictReader(open(work / "problems.csv"))}
  for mode in ("greedy", "sampled"):
    a = np.concatenate([res["models"]["iw_sft"][f"correct_{mode}"] for res in results])
    b = np.concatenate([res["models"]["sft"][f"correct_{mode}"] for res in results])
    row = problems[mode]
    assert int(row["problems"]) == len(a) == 2 * results[0]["eval_problems"]
    assert (int(row["b"]), int(row["c"])) == (
      int(((a == 1) & (b == 0)).sum()),
      int(((a == 0) & (b == 1)).sum()),
    )
    np.testing.assert_allclose(float(row["diff"]), 100 * (a.mean() - b.mean()), atol=1e-9)
  r = subprocess.run(cmd + ["--dry_run"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode == 0 and "0 run(s) to do" in r.stdout
