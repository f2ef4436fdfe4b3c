"""Train-state checkpoints, resumption, clean stops and non-finite handling (iwsft.io.checkpoint,
iwsft.fit)."""

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import iwsft
from iwsft.core.objectives import ObjectiveConfig
from iwsft.errors import UserError
from iwsft.io import checkpoint
from iwsft.io.preemption import Preempted
from iwsft.io.workdir import MetricsLog, read_rows

SFT = ObjectiveConfig()


def linear_logprob(params, batch):
  """A Gaussian with mean x·w and unit variance: log N(y; x·w, 1) per step, [B, T]."""
  mean = jnp.einsum("btd,d->bt", batch["x"], params["w"]) + params["b"]
  return -0.5 * (batch["y"] - mean) ** 2 - 0.5 * jnp.log(2 * jnp.pi)


def regression_data(n=16, t=5, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, t, d)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
  return {"x": x, "y": y, "mask": np.ones((n, t), np.float32), "weight": np.ones(n, np.float32)}


def fresh_state(optimizer, seed=0):
  return iwsft.init_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, optimizer, seed)


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(la, lb)
  )


def test_a_saved_train_state_restores_bit_for_bit(tmp_path):
  opt = optax.adam(1e-2)
  state = fresh_state(opt)
  update = jax.jit(iwsft.make_update(linear_logprob, opt, dataclasses.replace(SFT, q_decay=0.5)))
  batch = {k: v[:4] for k, v in regression_data().items()}
  for _ in range(3):
    state, _ = update(state, batch)
  ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "c"), every=1)
  ckpt.save(3, state)
  ckpt.wait()
  mesh = iwsft.make_mesh()
  restored, step = ckpt.restore_latest(
    jax.eval_shape(lambda: fresh_state(opt)), iwsft.core.sharding.replicated(mesh)
  )
  assert step == 3 and int(restored.step) == 3
  assert leaves_equal(restored, state)
  assert restored.key.dtype == jnp.uint32 and restored.key.shape == (2,)


def test_latest_k_and_the_best_evaluated_step_are_kept(tmp_path):
  opt = optax.sgd(0.1)
  ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "c"), every=1, keep=2)
  scores = {1: 5.0, 2: None, 3: 9.0, 4: 1.0, 5: None, 6: 2.0}
  for step, score in scores.items():
    ckpt.save(step, fresh_state(opt), metric=score)
  ckpt.wait()
  assert ckpt.steps() == [3, 5, 6]  # the newest two, and 3 (the best score)


def test_a_damaged_newest_step_is_skipped_with_a_warning(tmp_path):
  opt = optax.sgd(0.1)
  ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "c"), every=1, keep=5)
  for step in (1, 2):
    s = fresh_state(opt)
    ckpt.save(step, s.replace(step=jnp.asarray(step, jnp.int32)))
  ckpt.wait()
  step_dir = tmp_path / "c" / "2" / "state"
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\0garbage")
  with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
    restored, step = ckpt.restore_latest(
      jax.eval_shape(lambda: fresh_state(opt)), iwsft.core.sharding.replicated(iwsft.make_mesh())
    )
  assert step == 1 and int(restored.step) == 1


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  opt = optax.sgd(0.1)
  ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "c"), every=1)
  ckpt.save(1, fresh_state(opt))
  ckpt.wait()
  bigger = jax.eval_shape(lambda: iwsft.init_state({"w": jnp.zeros(4), "b": jnp.zeros(())}, opt, 0))
  with pytest.raises(UserError, match="another model"):
    ckpt.restore_latest(bigger, iwsft.core.sharding.replicated(iwsft.make_mesh()))
  with pytest.raises(UserError, match=r"float32\[4\]"):
    checkpoint.check_resumable(str(tmp_path / "c"), bigger)
  checkpoint.check_resumable(str(tmp_path / "c"), jax.eval_shape(lambda: fresh_state(opt)))
  checkpoint.check_resumable(str(tmp_path / "nothing"), bigger)
  assert not (tmp_path / "nothing").exists()


def test_skipping_a_non_finite_batch_leaves_the_model_unchanged():
  opt = optax.adam(1e-2)
  update = jax.jit(
    iwsft.make_update(
      linear_logprob, opt, dataclasses.replace(SFT, q_decay=0.5), skip_nonfinite=True
    )
  )
  batch = {k: v[:4] for k, v in regression_data().items()}
  state, m = update(fresh_state(opt), batch)
  assert float(m["skipped"]) == 0.0
  bad = dict(batch, y=batch["y"].copy())
  bad["y"][0, 0] = np.nan
  after, m = update(state, bad)
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert int(after.step) == int(state.step) + 1
  assert leaves_equal(
    (after.params, after.q_params, after.opt_state), (state.params, state.q_params, state.opt_state)
  )
  plain = jax.jit(iwsft.make_update(linear_logprob, opt, dataclasses.replace(SFT, q_decay=0.5)))
  poisoned, _ = plain(state, bad)
  assert not np.isfinite(np.asarray(poisoned.params["w"])).all()


def diverging_logprob(params, batch):
  """log-prob w per step: SGD on its NLL raises w by the learning rate each update; NaN once w >
  2.4."""
  logp = params["w"] * batch["mask"]
  return jnp.where(params["w"] > 2.4, jnp.nan, logp)


def test_a_non_finite_loss_stops_at_its_step_and_the_last_checkpoint_is_good(tmp_path):
  opt = optax.sgd(0.25)  # w after k updates is exactly 0.25 k: the 11th update sees w = 2.5
  data = regression_data()
  state = iwsft.init_state({"w": jnp.zeros(())}, opt, 0)
  update = iwsft.make_update(diverging_logprob, opt, dataclasses.replace(SFT, q_decay=0.0))
  ckpt = checkpoint.TrainCheckpoints(str(tmp_path / "c"), every=4)
  mesh = iwsft.make_mesh(1)
  with pytest.raises(FloatingPointError, match=r"at step 11; last good checkpoint: step 8"):
    iwsft.fit(
      update,
      state,
      data,
      np.zeros(16),
      iwsft.Sampling(20, 4, steps_per_dispatch=2),
      mesh=mesh,
      name="t",
      hooks=iwsft.Hooks(checkpoints=ckpt),
    )
  good, step = ckpt.restore_latest(
    jax.eval_shape(lambda: state), iwsft.core.sharding.replicated(mesh)
  )
  assert step == 8 and float(good.params["w"]) == 2.0

  rows = []
  skipping = iwsft.make_update(
    diverging_logprob, opt, dataclasses.replace(SFT, q_decay=0.0), skip_nonfinite=True
  )
  final = iwsft.fit(
    skipping,
    state,
    data,
    np.zeros(16),
    iwsft.Sampling(20, 4, steps_per_dispatch=5),
    mesh=mesh,
    name="t",
    hooks=iwsft.Hooks(logs=[rows.append]),
  )
  assert float(final.params["w"]) == 2.5 and int(final.step) == 20
  assert [r["skipped"] for r in rows] == [0.0, 0.0, 5.0, 5.0]


class StopAt:
  """A stand-in for PreemptionGuard whose signal 'arrives' once the state passes a given step."""

  def __init__(self, step):
    self.step, self.seen = step, 0

  @property
  def requested(self):
    self.seen += 1
    return self.seen * 5 >= self.step


def test_a_stopped_and_resumed_fit_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
  opt = optax.adam(3e-2)
  data = regression_data()
  logits = np.linspace(-1, 1, 16).astype(np.float32)
  update = iwsft.make_update(
    linear_logprob,
    opt,
    ObjectiveConfig(importance_weighting="sequence", q_decay=0.8),
    track_bounds=True,
  )
  mesh = iwsft.make_mesh(1)

  def run(workdir, guard=None):
    workdir.mkdir(exist_ok=True)
    log = MetricsLog(str(workdir / "metrics.jsonl"))
    ckpt = checkpoint.TrainCheckpoints(str(workdir / "c"), every=10)
    try:
      return iwsft.fit(
        update,
        fresh_state(opt, seed=3),
        data,
        logits,
        iwsft.Sampling(40, 4, steps_per_dispatch=5),
        mesh=mesh,
        name="s",
        hooks=iwsft.Hooks(
          logs=[log],
          evaluate=[lambda p: {"w0": float(p["w"][0])}],
          eval_every=20,
          checkpoints=ckpt,
          best_key="w0",
          guard=guard,
          on_resume=lambda s: log.drop_stage_after("s", s),
        ),
      )
    finally:
      log.close()

  whole = run(tmp_path / "a")
  with pytest.raises(Preempted) as stop:
    run(tmp_path / "b", guard=StopAt(15))
  assert stop.value.step == 15  # saved although checkpoint_every is 10
  assert 15 in checkpoint.TrainCheckpoints(str(tmp_path / "b" / "c"), every=10).steps()
  with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "stage": "s", "step": 20, "lo')  # a row torn by the stop
  resumed = run(tmp_path / "b")
  assert leaves_equal(resumed, whole)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
  a, b = (
    read_rows(str(tmp_path / "a" / "metrics.jsonl")),
    read_rows(str(tmp_path / "b" / "metrics.jsonl")),
  )
  assert strip(a) == strip(b)
  assert [r["step"] for r in a if r["kind"] == "train"] == list(range(5, 45, 5))


def test_metrics_log_drops_a_torn_line_and_rows_after_a_step(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(
    '{"stage": "a", "step": 1}\n{"stage": "b", "step": 1}\n{"stage": "b", "step": 2}\n{"sta'
  )
  log = MetricsLog(str(path))
  log({"stage": "b", "step": 3})
  log.drop_stage_after("b", 1)
  log.close()
  assert read_rows(str(path)) == [{"stage": "a", "step": 1}, {"stage": "b", "step": 1}]
  log = MetricsLog(str(path))
  log.drop_stage_after("a", 0)
  log.close()
  assert read_rows(str(path)) == [{"stage": "b", "step": 1}]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert read_rows(str(tmp_path / "absent.jsonl")) == []


@pytest.mark.parametrize("pipeline", ["control", "lm"])
def test_a_workdir_resumes_under_other_execution_settings_only(tmp_path, pipeline):
  """run.json records what decides a result: a rerun with another device count, sharding or
  metrics sink may resume; one with another learning rate is refused, and run.json stays."""
  from iwsft.control import config as control_config
  from iwsft.io import workdir
  from iwsft.lm import config as lm_config

  make = {"control": control_config.get_config, "lm": lm_config.get_config}[pipeline]
  path = str(tmp_path / "run")
  workdir.claim_workdir(path, workdir.result_settings(make()), overwrite=False)
  recorded = open(os.path.join(path, "run.json")).read()
  moved = make()
  moved.num_devices, moved.log.tensorboard = 1, False
  if "fsdp" in moved:
    moved.fsdp = 2
  _, changed = workdir.claim_workdir(path, workdir.result_settings(moved), overwrite=False)
  assert not changed and open(os.path.join(path, "run.json")).read() == recorded
  other = make()
  other.finetune.learning_rate *= 2
  with pytest.raises(UserError, match="other settings .*finetune"):
    workdir.claim_workdir(path, workdir.result_settings(other), overwrite=False)
  assert open(os.path.join(path, "run.json")).read() == recorded


@pytest.fixture
def git_head(monkeypatch):
  """A stand-in for git in a checkout, whatever this copy is: {"commit": ...} is what `git
  describe` answers; code_version's per-process answer is forgotten before and after."""
  import subprocess

  from iwsft.io import workdir

  head = {"commit": "aaaaaaaaaaaa"}
  ask = lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=head["commit"] + "\n")
  monkeypatch.setattr(workdir.subprocess, "run", ask)
  exists = os.path.exists
  monkeypatch.setattr(workdir.os.path, "exists", lambda p: p.endswith(".git") or exists(p))
  workdir.code_version.cache_clear()
  yield head
  workdir.code_version.cache_clear()


def test_a_run_records_the_commit_it_started_from(tmp_path, git_head):
  """claim_workdir asks git for the commit as the run starts: what result.json records later is
  that answer, whatever git says by then."""
  import iwsft
  from iwsft.io import workdir

  workdir.claim_workdir(str(tmp_path / "run"), {"lr": 1}, overwrite=False)
  git_head["commit"] = "bbbbbbbbbbbb"  # a commit while the run goes on
  assert workdir.code_version() == f"iwsft {iwsft.__version__} (git aaaaaaaaaaaa)"


def test_a_script_records_the_commit_it_started_from(monkeypatch, git_head):
  """cli.run asks git before the script's main runs (a dataset build or a peer run lasts hours
  without claiming a workdir)."""
  import sys

  import iwsft
  from iwsft.io import cli, workdir

  monkeypatch.setattr(sys, "argv", ["script"])
  seen = []

  def main(argv):
    git_head["commit"] = "bbbbbbbbbbbb"  # a commit while the script runs
    seen.append(workdir.code_version())

  with pytest.raises(SystemExit):
    cli.run(main)
  assert seen == [f"iwsft {iwsft.__version__} (git aaaaaaaaaaaa)"]


def test_a_setting_newer_than_the_recorded_run_matches_only_at_its_default(tmp_path):
  import json

  from iwsft.errors import UserError
  from iwsft.io import workdir

  defaults = {"config": {"lr": 0.1, "new": {"rows": 0, "temp": 1.0}}}
  path = str(tmp_path / "run")
  os.makedirs(path)
  with open(os.path.join(path, "run.json"), "w") as f:  # recorded before "new" existed
    json.dump({"config": {"lr": 0.1}}, f)
  now = {"config": {"lr": 0.1, "new": {"rows": 0, "temp": 1.0}}}
  _, changed = workdir.claim_workdir(path, now, False, "", defaults)
  assert not changed
  assert json.load(open(os.path.join(path, "run.json"))) == now  # recorded in full from now on
  with open(os.path.join(path, "run.json"), "w") as f:
    json.dump({"config": {"lr": 0.1}}, f)
  moved = {"config": {"lr": 0.1, "new": {"rows": 0, "temp": 0.7}}}
  with pytest.raises(UserError, match="other settings"):
    workdir.claim_workdir(path, moved, False, "", defaults)
  assert workdir.settings_difference(path, moved, defaults) is not None
  assert workdir.settings_difference(path, now, defaults) is None
  with pytest.raises(UserError, match="other settings"):  # without defaults: refused
    workdir.claim_workdir(path, now, False, "")
