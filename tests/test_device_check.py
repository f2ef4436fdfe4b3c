"""benchmarks/device_check.py, the script a lent GPU runs, on CPU with its tiny case: it compiles,
runs and reports the step, and its state size is the model's parameters and Adam's two float32
moments (12 bytes a parameter, counted here from the model)."""

import json
import os
import subprocess
import sys

from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_the_device_check_runs_its_tiny_case_and_sizes_the_state(tmp_path):
  from benchmarks.device_check import CASES
  from iwsft.lm.model import Transformer, param_count

  cmd = [sys.executable, "benchmarks/device_check.py", "--cases=tiny", "--steps=2"]
  r = subprocess.run(
    [*cmd, f"--out={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  (path,) = tmp_path.iterdir()
  (row,) = json.loads(path.read_text())["rows"]
  assert "error" not in row, row
  cfg, tokens = CASES["tiny"]
  n = param_count(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  state = row["state_gib"] * 2**30
  assert 12 * n <= state <= 12 * n + 1024  # plus the step, the key and Adam's count
  assert row["predicted_temp_gib"] > 0 and row["s_per_step"] > 0
  assert row["predicted_peak_gib"] >= row["state_gib"] + row["predicted_temp_gib"]
  assert row["tokens_per_s"] == tokens / row["s_per_step"]
  assert row["loss"] == row["loss"]  # finite: not NaN
