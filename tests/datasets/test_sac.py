"""The SAC behaviour-policy learner and the locomotion datasets it makes."""

import chex
import jax
import numpy as np
import pytest

from iwsft.datasets.sac import SACConfig, train_sac


def test_sac_return_rises_on_a_small_budget():
  cfg = SACConfig(
    total_steps=5000, start_steps=1000, snapshot_every=1000, hidden=(64, 64), eval_episodes=5
  )
  snaps, episodes, _ = train_sac(
    "InvertedPendulum-v5", cfg, env_kwargs={"max_episode_steps": 200}, progress=False
  )
  returns = [s.eval_return for s in snaps]
  assert [s.step for s in snaps] == [1000, 2000, 3000, 4000, 5000]
  assert max(returns[-2:]) > 2.5 * returns[0] and max(returns[-2:]) > 60, returns
  # Every environment step belongs to exactly one recorded episode (the last may be unfinished).
  steps = sum(len(e.actions) for e in episodes)
  assert 5000 - 200 < steps <= 5000 and all(e.terminated or e.truncated for e in episodes)
  ends = [e.end_step for e in episodes]
  assert ends == sorted(ends)


@pytest.mark.slow
def test_hopper_small_family(datasets):  # noqa: F811  (sets MINARI_DATASETS_PATH)
  import minari

  from iwsft import datasets as ds_lib
  from iwsft.control.data import episodes_from_minari, reference_scores

  rows = {
    r["dataset"].split("/")[-1].rsplit("-v", 1)[0]: r
    for r in ds_lib.build("hopper", "small", list(ds_lib.KINDS), seed=0, force=False)
  }
  assert (
    rows["expert"]["return_mean"] > rows["medium"]["return_mean"] > rows["random"]["return_mean"]
  )
  assert rows["medium-replay"]["return_std"] > 0.5 * rows["medium-replay"]["return_mean"]
  for _, row in rows.items():
    ds = minari.load_dataset(row["dataset"])
    lo, hi = reference_scores(ds)
    assert lo == pytest.approx(rows["random"]["return_mean"]) and hi == pytest.approx(
      rows["expert"]["return_mean"]
    )
    eps = episodes_from_minari(ds)
    assert eps.num_steps == row["steps"]
    np.testing.assert_allclose(eps.returns.mean(), row["return_mean"], rtol=1e-9)


def test_sac_trains_on_to_its_target_and_fails_clearly_below_it():
  from iwsft.datasets.sac import TargetNotReached
  from iwsft.errors import UserError

  base = dict(start_steps=200, snapshot_every=200, hidden=(16, 16), eval_episodes=2)
  kw = {"env_kwargs": {"max_episode_steps": 50}, "progress": False}
  # a target met at once: training stops after total_steps, as without one
  snaps, _, _ = train_sac(
    "InvertedPendulum-v5",
    SACConfig(total_steps=400, max_steps=2000, target_return=0.0, **base),
    **kw,
  )
  assert [s.step for s in snaps] == [200, 400]
  with pytest.raises(
    TargetNotReached,
    match=r"did not reach the target 1000000000 in two evaluations in a row within 800 steps",
  ):
    train_sac(
      "InvertedPendulum-v5",
      SACConfig(total_steps=400, max_steps=800, target_return=1e9, **base),
      **kw,
    )
  with pytest.raises(UserError, match="max_steps"):
    SACConfig(total_steps=400, max_steps=100, target_return=1.0)


@pytest.mark.slow  # test_an_interrupted_run_resumes_from_its_checkpoint_exactly runs by default
def test_a_run_stopped_at_its_step_cap_goes_on_exactly_when_the_cap_is_raised(
  tmp_path, monkeypatch
):
  """TargetNotReached at 600 steps, then the same recipe with max_steps 1,000 resumes from the
  last episode end before 600 and ends where a run capped at 1,000 from the start ends (compared
  through the checkpoints both write at every episode end of their last snapshot interval)."""
  from iwsft.datasets import sac
  from iwsft.datasets.sac import TargetNotReached
  from iwsft.errors import UserError

  real_bar, starts = sac.progress_lib.bar, []
  monkeypatch.setattr(
    sac.progress_lib, "bar", lambda *a, **k: starts.append(k["initial"]) or real_bar(*a, **k)
  )
  base = dict(total_steps=400, target_return=1e9, start_steps=200, snapshot_every=200)
  base.update(hidden=(16, 16), eval_episodes=2)
  kw = {"env_kwargs": {"max_episode_steps": 50}, "progress": False, "checkpoint_seconds": 1e9}
  run = lambda cap, path: train_sac(
    "InvertedPendulum-v5", SACConfig(max_steps=cap, **base), checkpoint=str(path), **kw
  )
  for cap, path in (
    (600, tmp_path / "raised"),
    (1000, tmp_path / "raised"),
    (1000, tmp_path / "whole"),
  ):
    with pytest.raises(TargetNotReached, match=f"within {cap:,} steps"):
      run(cap, path)
  assert 550 <= starts[1] <= 600 and starts[2] == 0  # the raised cap resumed; the other is new
  with pytest.raises(UserError, match="past the step cap 500: raise max_steps"):
    run(500, tmp_path / "raised")  # a cap below the saved step would throw the run away
  init_state = sac.make_sac(4, 1, SACConfig(max_steps=1000, **base))[0]
  raised, whole = (
    sac._load(str(tmp_path / p), SACConfig(max_steps=1000, **base), 1000, init_state)
    for p in ("raised", "whole")
  )
  assert raised.step == whole.step > 950 and raised.next_seed == whole.next_seed  # episodes <= 50
  assert [(s.step, s.eval_return) for s in raised.snapshots] == [
    (s.step, s.eval_return) for s in whole.snapshots
  ]
  assert [s.step for s in whole.snapshots] == [200, 400, 600, 800]
  for x, y in zip(jax.tree.leaves(raised.state), jax.tree.leaves(whole.state), strict=True):
    np.testing.assert_array_equal(x, y)


def test_training_stops_when_two_evaluations_in_a_row_reach_the_target():
  """A spike above the target followed by a fall is not enough; nor is anything before
  total_steps."""
  from iwsft.datasets.sac import Snapshot, _reached

  cfg = SACConfig(total_steps=300, max_steps=1000, target_return=600.0)
  snaps = lambda *returns: [Snapshot(100 * (i + 1), r, None) for i, r in enumerate(returns)]
  assert not _reached(cfg, 300, snaps(100, 900, 300))  # the spike at 200, then a fall
  assert not _reached(cfg, 300, snaps(100, 599.9, 700))
  assert _reached(cfg, 300, snaps(100, 600, 700))
  assert not _reached(cfg, 200, snaps(650, 700))  # before total_steps
  assert not _reached(cfg, 300, snaps(700))  # one evaluation only
  assert _reached(SACConfig(total_steps=300), 300, snaps(0, 0, 0))  # no target


def test_an_interrupted_run_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch):
  """Interrupted at step 700 of 1,200 and run again, training continues from the last episode
  boundary saved and ends with the snapshots and episodes of an uninterrupted run."""
  from iwsft.datasets import sac

  cfg = SACConfig(
    total_steps=1200, start_steps=200, snapshot_every=200, hidden=(16, 16), eval_episodes=2
  )
  kw = {"env_kwargs": {"max_episode_steps": 50}, "progress": False}
  whole_snaps, whole_eps, _ = train_sac("InvertedPendulum-v5", cfg, **kw)

  real_bar, starts = sac.progress_lib.bar, []

  def interrupting_bar(total, desc, initial=0, **k):
    b, first, done = real_bar(total, desc, initial=initial, **k), not starts, [initial]
    starts.append(initial)
    update = b.update

    def update_or_stop(n):
      if first and done[0] >= 700:
        raise KeyboardInterrupt
      done[0] += n
      update(n)

    b.update = update_or_stop
    return b

  monkeypatch.setattr(sac.progress_lib, "bar", interrupting_bar)
  ckpt = str(tmp_path / "run.ckpt")
  with pytest.raises(KeyboardInterrupt):
    train_sac("InvertedPendulum-v5", cfg, checkpoint=ckpt, checkpoint_seconds=0.0, **kw)
  snaps, eps, _ = train_sac("InvertedPendulum-v5", cfg, checkpoint=ckpt, **kw)
  assert 650 <= starts[1] <= 700  # resumed at the last episode end (episodes here: <= 50 steps)

  assert [(s.step, s.eval_return) for s in snaps] == [(s.step, s.eval_return) for s in whole_snaps]
  for a, b in zip(snaps, whole_snaps, strict=True):
    for x, y in zip(jax.tree.leaves(a.actor), jax.tree.leaves(b.actor), strict=True):
      np.testing.assert_array_equal(x, y)
  assert len(eps) == len(whole_eps)
  for a, b in zip(eps, whole_eps, strict=True):
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.observations, b.observations)
    assert (a.seed, a.end_step) == (b.seed, b.end_step)
  assert snaps[-1].seconds > 0

  # A checkpoint of another configuration is not resumed.
  other = SACConfig(**{**cfg.__dict__, "seed": 1})
  train_sac("InvertedPendulum-v5", other, checkpoint=ckpt, **kw)
  assert starts[2] == 0


def test_one_xla_thread_is_set_before_jax_starts_and_refused_after():
  import os
  import subprocess
  import sys

  from iwsft.io import cli

  code = "from iwsft.io import cli; cli.use_one_xla_thread(); import jax, os; jax.numpy.zeros(1)"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, "-c", code + "; print(os.environ['XLA_FLAGS'])"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == cli.ONE_XLA_THREAD
  jax.numpy.zeros(1).block_until_ready()  # this process's backend has started
  with pytest.raises(RuntimeError, match="no effect"):
    cli.use_one_xla_thread()


def test_the_behaviour_cache_holds_the_run_exactly(tmp_path):
  """Snapshots (actor params) and recorded episodes of every length, 0 included, read back as
  they were written, with the recipe and the training time; a crash after the new copy was
  complete but before it replaced the old one leaves the new copy readable."""
  import shutil

  from flax import nnx

  from iwsft.datasets import sac

  cfg = SACConfig(hidden=(8, 8), seed=3)
  rng = np.random.default_rng(0)
  actors = [nnx.state(sac.Actor(5, 2, cfg.hidden, nnx.Rngs(i))) for i in range(2)]
  snaps = [sac.Snapshot(100 * (i + 1), 1.5 * i, a, 7.0 * i) for i, a in enumerate(actors)]
  eps = [
    sac.Recorded(
      rng.normal(size=(t + 1, 5)),
      rng.normal(size=(t, 2)).astype(np.float32),
      rng.normal(size=t),
      t == 3,
      t != 3,
      40 + i,
      end_step=10 * i,
    )
    for i, t in enumerate((3, 0, 7))
  ]
  path = str(tmp_path / "cache")
  sac.write_behaviour(path, cfg, snaps, eps, 12.5)
  shutil.move(path, path + ".new")  # as a crash between the two steps of a replacement leaves it
  got_cfg, got_snaps, got_eps, seconds = sac.read_behaviour(path, 5, 2)
  assert got_cfg == cfg and seconds == 12.5
  assert [(s.step, s.eval_return, s.seconds) for s in got_snaps] == [
    (100, 0.0, 0.0),
    (200, 1.5, 7.0),
  ]
  for got, want in zip(got_snaps, snaps, strict=True):
    want_leaves = jax.tree.leaves(want.actor)
    chex.assert_trees_all_equal(jax.tree.leaves(got.actor), want_leaves)
  assert len(got_eps) == 3
  for got, want in zip(got_eps, eps, strict=True):
    for f in ("observations", "actions", "rewards"):
      np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert (got.terminated, got.truncated, got.seed, got.end_step) == (
      want.terminated,
      want.truncated,
      want.seed,
      want.end_step,
    )
  assert sac.read_behaviour(str(tmp_path / "none"), 5, 2) is None
