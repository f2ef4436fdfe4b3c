"""Experiment tracking: TensorBoard event files hold the metrics.jsonl rows (read back with an
independent reader); a Weights & Biases run logs them offline, with no network."""

import json
import os
import struct

import numpy as np


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files' TFRecord framing (8-byte length, 4-byte
  CRC, an Event protobuf, 4-byte CRC), decoded with tensorboardX's protobuf definitions."""
  from tensorboardX.proto.event_pb2 import Event

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      while header := f.read(12):
        (length,) = struct.unpack("<Q", header[:8])
        event = Event.FromString(f.read(length))
        f.read(4)
        for v in event.summary.value:
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_a_control_run_writes_its_metrics_to_tensorboard(datasets, tmp_path):
  from test_control import DS, MIXED, TINY, cli

  work = tmp_path / "run"
  r = cli(
    DS + MIXED, "--config.method=iw_sft", f"--workdir={work}", *TINY, "--config.eval.every=20"
  )
  assert r.returncode == 0, r.stderr[-2000:]
  scalars = read_scalars(str(work / "tensorboard"))
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  expected = {}
  for row in rows:
    for key, value in row.items():
      number = isinstance(value, int | float) and not isinstance(value, bool)
      if key not in ("step", "kind", "stage") and number and np.isfinite(value):
        expected.setdefault(f"{row['stage']}/{row['kind']}/{key}", []).append((row["step"], value))
  assert "iw_sft/train/iw/ess_fraction" in expected and "iw_sft/eval/normalised_score" in expected
  assert "final/eval/return_mean" in expected and set(scalars) == set(expected)
  for tag, points in expected.items():
    steps, values = zip(*points)
    assert [s for s, _ in scalars[tag]] == list(steps), tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], values, rtol=1e-6, err_msg=tag)


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
