"""experiments/ablations.py on the small mixed test dataset: the runs it makes and the table it
derives from them, recomputed here from each cell's own result.json and metrics.jsonl."""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MIXED
from scipy import stats
from test_control import NO_PERCENTILES, ROOT, TINY


def run_ablations(work, *flags) -> None:
  """experiments/ablations.py on the mixed test dataset at the tiny recipe, seeds 0 and 1."""
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "ablations.py"),
      f"--workdir={work}",
      f"--dataset={MIXED}",
      "--seeds=0,1",
      "--long=2",
      *TINY,
      NO_PERCENTILES,
      *flags,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]


def test_ablations_table_is_the_runs_paired_against_filtered_bc(datasets, tmp_path):
  work = tmp_path / "abl"
  run_ablations(
    work, "--temperatures=1,10", "--q_decays=0,0.9", "--config.curation.top_fraction=0.25"
  )
  rows = _ablation_rows(work)
  want = [
    "bc",
    "filtered_bc",
    "filtered_bc x2",
    "iw_sft (T=10, q=0.9)",
    "iw_sft T=1",
    "iw_sft q=0",
    "iw_sft x2",
  ]
  assert list(rows) == want

  def scores(run):
    res = [json.loads(open(p).read()) for p in _cells(work, run)]
    return np.array([x["normalised_score"] for x in res]), res

  dirs = {
    "filtered_bc": "filtered_bc",
    "filtered_bc x2": "filtered_bc_x2",
    "iw_sft T=1": "iw_sft_T=1",
    "iw_sft q=0": "iw_sft_q=0",
    "iw_sft x2": "iw_sft_x2",
  }
  for run, base in (
    ("iw_sft T=1", "filtered_bc"),
    ("iw_sft q=0", "filtered_bc"),
    ("iw_sft x2", "filtered_bc x2"),
  ):
    mine, res = scores(dirs[run])
    theirs, _ = scores(dirs[base])
    assert rows[run]["baseline"] == base
    np.testing.assert_allclose(float(rows[run]["diff"]), np.mean(mine - theirs), atol=1e-9)
    np.testing.assert_allclose(float(rows[run]["mean"]), np.mean(mine), atol=1e-9)
    ess = []
    for path in _cells(work, dirs[run]):
      lines = open(os.path.join(os.path.dirname(path), "metrics.jsonl")).read().splitlines()
      train = [json.loads(x) for x in lines]
      ess += [
        np.mean(
          [x["iw/ess_fraction"] for x in train if x["kind"] == "train" and x["stage"] == "iw_sft"]
        )
      ]
    np.testing.assert_allclose(float(rows[run]["iw/ess_fraction"]), np.mean(ess), rtol=1e-9)
    assert 0 < np.mean(ess) <= 1
  _, res = scores("iw_sft_T=1")
  assert res[0]["config"]["objective"]["temperature"] == 1.0
  _, res = scores("iw_sft_x2")
  assert res[0]["config"]["finetune"]["steps"] == 80
  # one π_ref per seed, trained once and shared: bc's policy is it
  data = work / MIXED.replace("/", "__")
  assert (data / "reference_0-1" / "reference.json").exists()
  assert sorted(p.name for p in data.glob("reference*")) == ["reference_0-1"]
  assert (work / "ablations.png").stat().st_size > 10_000
  assert "iw_sft T=1 − filtered_bc" in (work / "table.md").read_text()  # the engine's pairs too
  assert rows["filtered_bc"]["diff"] == ""  # baselines have no paired difference
  lengths = {run: rows[run]["length"] for run in ("bc", "iw_sft T=1", "iw_sft x2")}
  assert lengths == {"bc": "", "iw_sft T=1": "1.0", "iw_sft x2": "2.0"}
  assert (work / "length.png").stat().st_size > 10_000  # iw_sft and filtered_bc at two lengths


@pytest.mark.slow
def test_ablations_of_iw_sft_q_pair_with_sft_q(datasets, tmp_path):
  work = tmp_path / "abl_q"
  run_ablations(work, "--method=iw_sft_q", "--temperatures=10", "--q_decays=0")
  rows = _ablation_rows(work)
  assert list(rows) == [
    "bc",
    "sft_q",
    "sft_q x2",
    "iw_sft_q (T=10, q=0.9)",
    "iw_sft_q q=0",
    "iw_sft_q x2",
  ]
  for run, base in (("iw_sft_q q=0", "sft_q"), ("iw_sft_q x2", "sft_q x2")):
    assert rows[run]["baseline"] == base
    assert 0 < float(rows[run]["iw/ess_fraction"]) <= 1
  methods = {
    d: json.loads(open(_cells(work, d)[0]).read())["config"]["method"]
    for d in ("sft_q", "sft_q_x2", "iw_sft_q_q=0")
  }
  assert methods == {"sft_q": "sft_q", "sft_q_x2": "sft_q", "iw_sft_q_q=0": "iw_sft_q"}
  lines = {x.split(" | ")[0]: x for x in (work / "table.md").read_text().splitlines()}
  assert "− baseline, paired" in lines["| run"]  # two baselines: each row names its own
  assert lines["| iw_sft_q q=0"].split(" | ")[4].endswith("− sft_q")
  assert lines["| iw_sft_q x2"].split(" | ")[4].endswith("− sft_q x2")
  assert rows["sft_q"]["iw/ess_fraction"] == ""  # an unweighted method has no weight diagnostics


def _ablation_rows(work) -> dict:
  """ablations.csv as {run: row}, in the file's order."""
  return {row["run"]: row for row in csv.DictReader(open(work / "ablations.csv"))}


def _cells(work, run_dir: str) -> list[str]:
  """The result.json of each seed of a variant (its directory name), in seed order."""
  pattern = os.path.join(
    work, MIXED.replace("/", "__"), run_dir, "group_*", "seed_*", "result.json"
  )
  return sorted(glob.glob(pattern))


@pytest.mark.slow
def test_the_curation_family_sharpens_each_unweighted_method_against_its_recipe(datasets, tmp_path):
  work = tmp_path / "abl_c"
  run_ablations(work, "--family=curation", "--percentiles=90", "--betas=0.05", "--batch=16")
  rows = _ablation_rows(work)
  assert list(rows) == [
    "bc",
    "bc_continued",
    "filtered_bc",
    "sft_q beta=0.1",
    "iw_sft",
    "iw_sft_q beta=0.1",
    "filtered_bc p90",
    "sft_q beta=0.05",
    "sft_q linear",
    "filtered_bc b16",
    "sft_q b16",
    "iw_sft b16",
    "iw_sft_q b16",
  ]
  baselines = {
    "filtered_bc p90": "filtered_bc",
    "sft_q beta=0.05": "sft_q beta=0.1",
    "sft_q linear": "sft_q beta=0.1",
    "iw_sft b16": "filtered_bc b16",
    "iw_sft_q b16": "sft_q b16",
    "iw_sft_q beta=0.1": "sft_q beta=0.1",
  }
  assert {r: rows[r]["baseline"] for r in baselines} == baselines
  config = lambda d: json.loads(open(_cells(work, d)[0]).read())["config"]
  assert config("filtered_bc_p90")["curation"]["percentiles"] == [90.0]
  assert config("sft_q_linear")["curation"]["quality_mode"] == "linear"
  assert config("sft_q_beta=0.05")["curation"]["quality_beta"] == 0.05
  assert config("iw_sft_q_b16")["finetune"]["batch_size"] == 16
  scores = lambda d: np.array(
    [json.loads(open(p).read())["normalised_score"] for p in _cells(work, d)]
  )
  for run, base in (("sft_q linear", "sft_q_beta=0.1"), ("iw_sft b16", "filtered_bc_b16")):
    diff = scores(run.replace(" ", "_")) - scores(base)
    np.testing.assert_allclose(float(rows[run]["diff"]), diff.mean(), atol=1e-9)
  assert "− baseline, paired" in (work / "table.md").read_text()


@pytest.mark.slow
def test_the_length_family_pairs_each_weighted_method_at_every_length(datasets, tmp_path):
  work = tmp_path / "abl_l"
  run_ablations(work, "--family=length", "--lengths=1,2", NO_PERCENTILES)
  rows = _ablation_rows(work)
  assert list(rows) == [
    "bc",
    "filtered_bc",
    "iw_sft",
    "sft_q",
    "iw_sft_q",
    "filtered_bc x2",
    "iw_sft x2",
    "sft_q x2",
    "iw_sft_q x2",
  ]
  assert rows["iw_sft x2"]["baseline"] == "filtered_bc x2"
  assert rows["iw_sft_q"]["baseline"] == "sft_q"
  ablates = [rows[r]["ablates"] for r in ("filtered_bc", "iw_sft", "iw_sft_q", "iw_sft x2")]
  assert ablates == ["baseline", "recipe", "recipe", "fine-tuning length"]
  steps = lambda d: json.loads(open(_cells(work, d)[0]).read())["config"]["finetune"]["steps"]
  assert (steps("iw_sft"), steps("sft_q_x2")) == (40, 80)
  for run, d in (("filtered_bc x2", "filtered_bc_x2"), ("iw_sft", "iw_sft")):
    moved = [
      json.loads(open(p).read())["final_log_ratio"]["mean_log_ratio"] for p in _cells(work, d)
    ]
    np.testing.assert_allclose(float(rows[run]["divergence"]), np.mean(moved), rtol=1e-9)
    half = stats.t.ppf(0.975, len(moved) - 1) * np.std(moved, ddof=1) / np.sqrt(len(moved))
    np.testing.assert_allclose(float(rows[run]["divergence_low"]), np.mean(moved) - half)
    np.testing.assert_allclose(float(rows[run]["divergence_high"]), np.mean(moved) + half)
  assert rows["bc"]["divergence"] == ""  # π_ref has not moved from itself
  assert [float(rows[r]["length"]) for r in ("sft_q", "iw_sft_q x2")] == [1.0, 2.0]
  assert (work / "length.png").stat().st_size > 10_000
  trend = [x for x in (work / "table.md").read_text().splitlines() if x.startswith("| iw_sft")]
  assert [x.split("|")[1:3] for x in trend[-2:]] == [
    [" iw_sft − filtered_bc ", " 1× / 2× "],
    [" iw_sft_q − sft_q ", " 1× / 2× "],
  ]
  # a piece run on its own (one pair, one length) trains the same π_ref and the same cells, so
  # joining it with the whole gives the whole's table, to the last digit
  piece = tmp_path / "abl_l_x2"
  run_ablations(piece, "--family=length", "--lengths=2", "--weighted=iw_sft", NO_PERCENTILES)
  assert list(_ablation_rows(piece)) == ["bc", "filtered_bc x2", "iw_sft x2"]
  joined = tmp_path / "joined"
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "report.py"), f"--dir={joined}"]
    + ["--ablation", f"--merge={work},{piece}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert (joined / "ablations.csv").read_text() == (work / "ablations.csv").read_text()


def test_a_weighted_method_the_length_family_lacks_is_one_line_exit_2(tmp_path):
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "ablations.py"), "--family=length"]
    + ["--weighted=iw_sft,sft_q", f"--workdir={tmp_path / 'w'}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "iw_sft, iw_sft_q" in lines[0], r.stderr
  assert not (tmp_path / "w").exists()
