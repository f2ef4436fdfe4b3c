"""The locally generated D4RL-style dataset family (small profile of the scripted pendulum)."""

import numpy as np
import pytest

from iwsft.control import collect, datasets


@pytest.fixture(scope="module")
def family():
  """Builds the whole small family once (about 10 s) -> {kind: summary row}."""
  rows = datasets.build("pendulum", "small", list(collect.PENDULUM_KINDS), seed=0, force=False)
  return {r["dataset"].split("/")[-1].removesuffix("-v0"): r for r in rows}


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

  for kind in collect.PENDULUM_KINDS:
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
