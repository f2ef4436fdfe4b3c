"""Experiment tracking: TensorBoard event files hold the metrics.jsonl rows (read back with an
independent reader); a Weights & Biases run logs them offline, with no network."""

import json
import os
import struct

import numpy as np
import pytest


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} as TensorBoard shows them: every directory under `logdir` is a
  run whose event files are read in name order from their TFRecord framing (8-byte length, 4-byte
  CRC, an Event protobuf, 4-byte CRC), decoded with tensorboardX's protobuf definitions; a
  SessionLog START event at step S hides the run's events at steps >= S read before it
  (TensorBoard's purge of orphaned data)."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  out: dict[str, list[tuple[int, float]]] = {}
  for run, _, files in sorted(os.walk(logdir)):
    events: list[tuple[str, int, float]] = []
    for name in sorted(f for f in files if "tfevents" in f):
      with open(os.path.join(run, name), "rb") as f:
        while header := f.read(12):
          (length,) = struct.unpack("<Q", header[:8])
          event = Event.FromString(f.read(length))
          f.read(4)
          if event.session_log.status == SessionLog.START:
            events = [e for e in events if e[1] < event.step]
          events += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    for tag, step, value in events:
      out.setdefault(tag, []).append((step, value))
  return out


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """The TensorBoard points of metrics.jsonl rows: tag "<stage>/<kind>/<key>", finite numbers."""
  expected: dict[str, list[tuple[int, float]]] = {}
  for row in rows:
    for key, value in row.items():
      number = isinstance(value, int | float) and not isinstance(value, bool)
      if key not in ("step", "kind", "stage") and number and np.isfinite(value):
        expected.setdefault(f"{row['stage']}/{row['kind']}/{key}", []).append((row["step"], value))
  return expected


def test_a_resumed_stage_shows_each_step_once_in_tensorboard(tmp_path):
  """A stage resumed from a checkpoint drops its rows past that step from metrics.jsonl; the ones
  TensorBoard already holds must be hidden too, for that stage only, or its curves show the
  dropped steps twice. A stage restarted from 0 hides all of its earlier points."""
  from iwsft.io import tracking, workdir

  path, cfg = str(tmp_path / "metrics.jsonl"), tracking.TrackingConfig()
  log = tracking.open_log(path, cfg)
  for step in range(1, 6):
    log({"kind": "train", "stage": "reference", "step": step, "loss": 10.0 + step})
  for step in range(1, 4):
    log({"kind": "train", "stage": "iw_sft", "step": step, "loss": 20.0 + step})
  log.close()  # the run is killed; the reference checkpoint is at step 3, iw-SFT's at none
  log = tracking.open_log(path, cfg)
  log.drop_stage_after("reference", 3)
  log.drop_stage_after("iw_sft", 0)
  for step in (4, 5):
    log({"kind": "train", "stage": "reference", "step": step, "loss": 30.0 + step})
  log({"kind": "train", "stage": "iw_sft", "step": 1, "loss": 41.0})
  log.close()
  expected = _expected(workdir.read_rows(path))
  assert expected["reference/train/loss"] == [(1, 11), (2, 12), (3, 13), (4, 34), (5, 35)]
  assert expected["iw_sft/train/loss"] == [(1, 41)]
  assert read_scalars(str(tmp_path / "tensorboard")) == expected


def test_a_control_run_writes_its_metrics_to_tensorboard(datasets, tmp_path):
  from test_control import DS, MIXED, TINY, cli

  work = tmp_path / "run"
  r = cli(
    DS + MIXED, "--config.method=iw_sft", f"--workdir={work}", *TINY, "--config.eval.every=20"
  )
  assert r.returncode == 0, r.stderr[-2000:]
  scalars = read_scalars(str(work / "tensorboard"))
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  expected = _expected(rows)
  assert "iw_sft/train/iw/ess_fraction" in expected and "iw_sft/eval/normalised_score" in expected
  assert "final/eval/return_mean" in expected and set(scalars) == set(expected)
  for tag, points in expected.items():
    steps, values = zip(*points)
    assert [s for s, _ in scalars[tag]] == list(steps), tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], values, rtol=1e-6, err_msg=tag)


@pytest.mark.slow  # TensorBoard's test runs by default
def test_wandb_logs_a_run_offline(datasets, tmp_path):
  """--config.log.wandb=true with the default offline mode: a W&B run directory under the workdir
  whose transaction log names the metrics and their values (no network is used)."""
  import glob

  from test_control import DS, MIXED, TINY, cli

  work = tmp_path / "run"
  r = cli(
    DS + MIXED, "--config.method=iw_sft", f"--workdir={work}", *TINY, "--config.log.wandb=true"
  )
  assert r.returncode == 0, r.stderr[-2000:]
  logs = glob.glob(str(work / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(logs) == 1, os.listdir(work)
  raw = open(logs[0], "rb").read()
  final = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()][-1]
  for tag in ("iw_sft/train/loss", "iw_sft/train/iw/ess_fraction", "final/eval/return_mean"):
    assert tag.encode() in raw, tag
  # the value follows its tag, as W&B's JSON writes floats (shortest repr, whole numbers bare)
  value = repr(float(final["return_mean"])).removesuffix(".0")
  assert value.encode() in raw.split(b"final/eval/return_mean", 1)[1][:40], value
  result = json.loads((work / "result.json").read_text())
  assert "log" in result["config"] and result["config"]["log"]["wandb"] is True
