"""The locally generated D4RL-style dataset family (small profile of the scripted pendulum)."""

import os

import numpy as np
import pytest

from iwsft import datasets

# A SAC profile of seconds, with no target and no family checks (its policies are far too weak).
TINY = {
  "sac": {
    "total_steps": 1_200,
    "start_steps": 400,
    "snapshot_every": 400,
    "hidden": (16, 16),
    "eval_episodes": 2,
  },
  "episodes": {"random": 3, "medium": 2, "expert": 2},
}


@pytest.fixture(scope="module")
def family():
  """Builds the whole small family once (about 10 s) -> {kind: summary row}."""
  rows = datasets.build("pendulum", "small", list(datasets.KINDS), seed=0, force=False)
  return {r["dataset"].split("/")[-1].rsplit("-v", 1)[0]: r for r in rows}


def test_returns_order_expert_medium_random_and_replay_is_spread(family):
  assert family["expert"]["return_mean"] > 3 * family["medium"]["return_mean"]
  assert family["medium"]["return_mean"] > 10 * family["random"]["return_mean"]
  replay = family["medium-replay"]
  assert replay["return_std"] > 0.5 * replay["return_mean"]
  me = family["medium-expert"]
  assert me["episodes"] == family["medium"]["episodes"] + family["expert"]["episodes"]


def test_reference_scores_are_random_and_expert_means(family):
  import minari

  from iwsft.control.data import reference_scores

  for kind in datasets.KINDS:
    lo, hi = reference_scores(minari.load_dataset(datasets.dataset_id("pendulum", "small", kind)))
    np.testing.assert_allclose(lo, family["random"]["return_mean"])
    np.testing.assert_allclose(hi, family["expert"]["return_mean"])


def test_same_seed_same_data_whatever_else_is_built(family, tmp_path, monkeypatch):
  import minari

  from iwsft.control.data import episodes_from_minari

  did = datasets.dataset_id("pendulum", "small", "medium")
  first = episodes_from_minari(minari.load_dataset(did))
  monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
  datasets.build("pendulum", "small", ["medium"], seed=0, force=False)
  again = episodes_from_minari(minari.load_dataset(did))
  np.testing.assert_array_equal(first.actions, again.actions)
  np.testing.assert_array_equal(first.returns, again.returns)


def test_sac_family_trains_once_and_reports_stored_build_times(tmp_path, monkeypatch):
  """A kind built later (or after an interruption) reads the trained behaviour policies back instead
  of training again, and gives the data a fresh build gives; the table shows each dataset's stored
  recording time, reused or not."""
  import minari

  from iwsft.control.data import episodes_from_minari
  from iwsft.datasets import sac

  monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
  monkeypatch.setitem(datasets.SAC_PROFILES, "tiny", TINY)
  calls = []
  train = sac.train_sac
  monkeypatch.setattr(sac, "train_sac", lambda *a, **k: calls.append(1) or train(*a, **k))

  first = datasets.build("hopper", "tiny", ["medium"], seed=0, force=False)
  assert len(calls) == 1
  did = datasets.dataset_id("hopper", "tiny", "medium")
  before = episodes_from_minari(minari.load_dataset(did))
  minari.delete_dataset(did)
  again = datasets.build("hopper", "tiny", ["medium", "expert"], seed=0, force=False)
  assert len(calls) == 1  # read back from the cache
  after = episodes_from_minari(minari.load_dataset(did))
  np.testing.assert_array_equal(before.actions, after.actions)

  expert = next(r for r in again if "/expert-v" in r["dataset"])
  stored = minari.load_dataset(expert["dataset"]).storage.metadata["iwsft_seconds"]
  assert (
    expert["origin"] == "reused" and expert["seconds"] == stored >= 0
  )  # the time stored when it was built
  assert first[0]["behaviour_seconds"] == again[0]["behaviour_seconds"] > 0
  text = datasets.table(again)
  assert f"{expert['seconds']:.1f} (reused)" in text
  assert (
    f"SAC behaviour training for iwsft/hopper: {first[0]['behaviour_seconds']:.1f} seconds" in text
  )


def test_family_checks_against_hand_computed_thresholds():
  """random 0, expert 100 (gap 100): medium must lie in [15, 70]; with medium 33, medium-replay
  needs enough episodes whose 10th-90th percentile spread is at least 33 / 4 = 8.25."""
  rng = np.random.default_rng(0)
  good = {
    "random": np.zeros(5),
    "medium": np.full(5, 33.0),
    "expert": np.full(5, 100.0),
    "medium-replay": np.linspace(0, 40, 60),  # p90 - p10 = 32
  }
  assert datasets.check_family(good, 90.0, 50) == []
  bad = lambda **kinds: datasets.check_family({**good, **kinds}, 90.0, 50)
  assert "not clearly between" in bad(medium=np.full(5, 14.0))[0]
  assert "not clearly between" in bad(medium=np.full(5, 71.0))[0]
  assert "below the target 90.0" in bad(expert=np.full(5, 89.0))[0]
  assert "not above" in bad(expert=np.zeros(5))[0]
  assert "fewer than 50" in bad(**{"medium-replay": np.linspace(0, 40, 49)})[0]
  narrow = 20.0 + rng.uniform(-4.0, 4.0, 60)  # p90 - p10 < 8 < 8.25
  assert "less than a quarter of medium − random (33.0)" in bad(**{"medium-replay": narrow})[0]


def test_medium_replay_runs_past_medium_only_to_reach_its_minimum():
  from iwsft.datasets import sac

  ends = [1_000, 2_000, 3_000, 4_000, 5_000]
  eps = [sac.Recorded(None, None, None, False, True, 0, end_step=s) for s in ends]
  steps = lambda medium, at_least: [
    e.end_step for e in datasets.replay_episodes(eps, medium, at_least)
  ]
  assert steps(3_500, 2) == [1_000, 2_000, 3_000]  # up to medium: more than the minimum
  assert steps(3_000, 0) == [1_000, 2_000, 3_000]  # an episode ending at the snapshot is in
  assert steps(1_500, 4) == [1_000, 2_000, 3_000, 4_000]  # the next ones fill the minimum
  assert steps(1_500, 9) == ends  # no more than the learner played


def test_trained_policies_are_reused_under_a_raised_step_cap_only(tmp_path):
  from flax import nnx

  from iwsft.datasets import families, sac

  cfg = sac.SACConfig(total_steps=400, max_steps=600, target_return=1.0, hidden=(4,))
  path = str(tmp_path / "cache")
  actor = nnx.state(sac.Actor(3, 1, cfg.hidden, nnx.Rngs(0)))
  sac.write_behaviour(path, cfg, [sac.Snapshot(500, 2.0, actor)], [], 1.5)
  read = lambda **changes: families._read_cache(
    path, sac.SACConfig(**{**cfg.__dict__, **changes}), 3, 1
  )
  assert read(max_steps=600)[2] == 1.5 and read(max_steps=900)[2] == 1.5  # it stopped at 500
  assert read(max_steps=450) is None  # it would have stopped at 450: another run
  assert read(seed=1) is None


def test_a_family_that_fails_its_checks_is_an_error_not_a_dataset(tmp_path, monkeypatch):
  import minari

  from iwsft.errors import UserError

  monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
  monkeypatch.setitem(
    datasets.SAC_PROFILES, "tiny", {**TINY, "checks": {"min_replay_episodes": 10**6}}
  )
  with pytest.raises(UserError, match="failed its quality checks .*fewer than 1000000.*deleted"):
    datasets.build("hopper", "tiny", ["medium-replay"], seed=0, force=False)
  assert minari.list_local_datasets() == {}
  curve = tmp_path / ".iwsft-behaviour" / "hopper-tiny-seed0.png"  # kept with the SAC policies
  assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_small_hopper_family_is_installed_from_the_shipped_copy(tmp_path, monkeypatch):
  """No SAC run: the shipped files are copied byte for byte, and say so in the table."""
  from iwsft.datasets import sac, shipped

  monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
  monkeypatch.setattr(sac, "train_sac", lambda *a, **k: pytest.fail("trained SAC"))
  rows = datasets.build("hopper", "small", ["medium-replay"], seed=0, force=False)
  ids = {datasets.dataset_id("hopper", "small", k) for k in datasets.KINDS}
  assert ids == set(shipped.shipped_ids())
  assert [r["origin"] for r in rows] == ["shipped"]
  for did in ids - {datasets.dataset_id("hopper", "small", "medium-expert")}:  # not needed here
    data = os.path.join(did, "data", "main_data.hdf5")
    installed = open(os.path.join(tmp_path, data), "rb").read()
    assert installed == open(os.path.join(shipped.ROOT, data), "rb").read()
  assert "(shipped)" in datasets.table(rows)


def test_a_run_on_a_shipped_dataset_installs_it_when_missing(tmp_path, monkeypatch):
  """load_dataset (every run's way in) installs a shipped dataset that is not local, so a fresh
  clone can train on experiments/control.py's default dataset without building anything."""
  from iwsft.control.data import load_dataset

  monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
  ds = load_dataset(datasets.dataset_id("hopper", "small", "medium-replay"))
  assert ds.total_episodes == 256 and ds.total_steps == 7412


def test_episodes_recorded_side_by_side_do_not_depend_on_their_neighbours():
  """Episode i is reset with seed + i and acts from Generator (seed, i), whatever the width."""
  import gymnasium as gym

  from iwsft.datasets.collect import random_behaviour, record_episodes

  env_id, space = "Hopper-v5", gym.make("Hopper-v5").action_space
  alone = record_episodes(env_id, random_behaviour(space), range(3, 8), seed=50, width=1)
  side = record_episodes(env_id, random_behaviour(space), range(3, 8), seed=50, width=4)
  assert [e.seed for e in side] == [53, 54, 55, 56, 57]
  for a, b in zip(alone, side, strict=True):
    np.testing.assert_array_equal(a.observations, b.observations)
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.rewards, b.rewards)
  env, e = gym.make(env_id), side[2]  # index 5, computed here step by step
  obs, _ = env.reset(seed=55)
  rng = np.random.default_rng([50, 5])
  np.testing.assert_array_equal(e.observations[0], obs)
  for t, action in enumerate(e.actions):
    np.testing.assert_array_equal(action, rng.uniform(space.low, space.high).astype(np.float32))
    obs, r, term, trunc, _ = env.step(action)
    np.testing.assert_array_equal(e.observations[t + 1], obs)
    assert e.rewards[t] == r and (term or trunc) == (t == len(e.actions) - 1)
  assert e.terminated == term and e.truncated == trunc


def test_the_numpy_sampler_is_the_actor_with_its_noise_given():
  import jax.numpy as jnp
  from flax import nnx

  from iwsft.datasets.sac import Actor, numpy_sampler

  actor = Actor(11, 3, (32, 32), nnx.Rngs(0))
  obs = np.random.default_rng(0).normal(size=(7, 11)).astype(np.float32)
  noise = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
  mean, log_std = actor.dist(jnp.asarray(obs))
  expected = np.tanh(np.asarray(mean) + np.exp(np.asarray(log_std)) * noise)
  got = numpy_sampler(nnx.state(actor))(obs, noise)
  assert got.shape == (7, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
