"""The main job end to end on the shipped data (slow: `make test-slow`)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_main_job_curation_beats_bc_by_more_than_the_seed_spread(datasets, tmp_path):  # noqa: ARG001
  """Filtered BC and iw-SFT each beat BC by more than the seed spread (the larger of the two seed
  standard deviations) on the shipped Hopper medium-expert data, as the README's table shows."""
  work = tmp_path / "demo"
  r = subprocess.run(
    [sys.executable, "experiments/demo.py", f"--workdir={work}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "(shipped)" in r.stdout
  cells = list(csv.DictReader(open(work / "cells.csv")))
  scores = {}
  for method in ("bc", "filtered_bc", "iw_sft"):
    mine = sorted((c for c in cells if c["method"] == method), key=lambda c: int(c["seed"]))
    assert [int(c["seed"]) for c in mine] == [0, 1, 2]
    scores[method] = np.array([float(c["score"]) for c in mine])
    for c in mine:  # the table's score is the cell's own final evaluation
      result = json.loads((work / c["cell"] / "result.json").read_text())
      assert result["normalised_score"] == float(c["score"])
      assert (work / c["cell"] / "video.gif").exists()
  bc = scores["bc"]
  for method in ("filtered_bc", "iw_sft"):
    spread = max(bc.std(ddof=1), scores[method].std(ddof=1))
    assert scores[method].mean() - bc.mean() > spread, scores
  assert (work / "scores.png").stat().st_size > 10_000
  assert "iw_sft − bc" in (work / "table.md").read_text()
