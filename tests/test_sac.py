"""The SAC behaviour-policy learner and the locomotion datasets it makes."""

import numpy as np
import pytest

from iwsft.control.datasets.sac import SACConfig, train_sac


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

  from iwsft.control import datasets as ds_lib
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
  from iwsft.control.datasets.sac import TargetNotReached

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
    TargetNotReached, match=r"in 800 steps, below the target 1000000000: raise max_steps"
  ):
    train_sac(
      "InvertedPendulum-v5",
      SACConfig(total_steps=400, max_steps=800, target_return=1e9, **base),
      **kw,
    )
  with pytest.raises(ValueError, match="max_steps"):
    SACConfig(total_steps=400, max_steps=100, target_return=1.0)
