"""The locally generated D4RL-style dataset family (small profile of the scripted pendulum)."""

import os

import numpy as np
import pytest

from iwsft.control import datasets

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
  from iwsft.control.datasets import sac

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


def test_the_small_hopper_family_is_installed_from_the_shipped_copy(tmp_path, monkeypatch):
  """No SAC run: the shipped files are copied byte for byte, and say so in the table."""
  from iwsft.control.datasets import sac, shipped

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
