"""Curation: filters, stratified oversampling and quality weights against direct computations."""

import numpy as np
import pytest

from iwsft.core import curation
from iwsft.errors import UserError


def test_top_fraction_keeps_exactly_the_best():
  scores = np.array([3.0, 9.0, 1.0, 7.0, 5.0, 8.0, 2.0, 6.0, 4.0, 0.0])
  keep = curation.top_fraction_mask(scores, 0.3)
  assert set(np.flatnonzero(keep)) == {1, 5, 3}
  assert curation.top_fraction_mask(scores, 1.0).all()
  assert curation.top_fraction_mask(scores, 0.01).sum() == 1


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_top_fraction_out_of_range_is_a_user_error(bad):
  with pytest.raises(UserError, match="top_fraction"):
    curation.top_fraction_mask(np.arange(5.0), bad)


def test_percentile_multiplicity_counts_memberships():
  scores = np.arange(100.0)  # percentile p of 0..99 is 0.99 p
  mult = curation.percentile_multiplicity(scores, (90, 95, 98))
  expected = (scores >= 89.1).astype(int) + (scores >= 94.05) + (scores >= 97.02)
  np.testing.assert_array_equal(mult, expected)
  assert mult.max() == 3 and (mult == 3).sum() == 2


def test_sampling_logits_per_method():
  scores = np.arange(20.0)
  np.testing.assert_array_equal(curation.sampling_logits(scores, "bc"), np.zeros(20))
  lg = curation.sampling_logits(scores, "filtered_bc", top_fraction=0.25)
  assert np.isfinite(lg).sum() == 5 and np.all(np.isfinite(lg[15:]))
  lg = curation.sampling_logits(scores, "iw_sft", percentiles=(50, 90))
  expected = (scores >= np.percentile(scores, 50)).astype(int) + (
    scores >= np.percentile(scores, 90)
  ).astype(int)
  np.testing.assert_allclose(np.exp(lg), expected, rtol=1e-6)
  q = curation.sampling_logits(scores, "sft_q", quality_beta=0.5)
  np.testing.assert_allclose(q, scores / 19.0 / 0.5, rtol=1e-6)


def test_quality_weights_are_softmax_of_normalised_scores_with_mean_one():
  scores = np.array([10.0, 20.0, 40.0])
  w = curation.quality_weights(scores, beta=0.25)
  e = np.exp(np.array([0.0, 1 / 3, 1.0]) / 0.25)
  np.testing.assert_allclose(w, e / e.mean(), rtol=1e-9)


def test_unknown_method_and_empty_data_are_user_errors():
  with pytest.raises(UserError):
    curation.sampling_logits(np.arange(3.0), "dpo")
  with pytest.raises(UserError):
    curation.sampling_logits(np.array([]), "bc")


def test_with_overrides_sets_dotted_keys_on_a_copy():
  import ml_collections

  from iwsft.core.config import with_overrides
  from iwsft.errors import UserError

  cfg = ml_collections.ConfigDict({"method": "bc", "finetune": {"steps": 10, "lr": 0.1}})
  out = with_overrides(cfg, {"method": "iw_sft", "finetune.steps": 40})
  assert (out.method, out.finetune.steps, out.finetune.lr) == ("iw_sft", 40, 0.1)
  assert (cfg.method, cfg.finetune.steps) == ("bc", 10)  # the original is untouched
  for bad in ("finetune.stepz", "nowhere.steps", "method.x"):
    with pytest.raises(UserError, match=bad):
      with_overrides(cfg, {bad: 1})


def test_linear_quality_mode_samples_in_proportion_to_the_normalised_score():
  scores = np.array([5.0, 7.0, 10.0, 15.0])
  lg = curation.sampling_logits(scores, "sft_q", quality_mode="linear")
  p = np.exp(lg - lg.max())
  np.testing.assert_allclose(p / p.sum(), np.array([0.0, 2.0, 5.0, 10.0]) / 17.0, atol=1e-7)
  with pytest.raises(UserError, match="quality_mode"):
    curation.sampling_logits(scores, "sft_q", quality_mode="square")
