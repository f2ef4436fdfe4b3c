"""Objectives against independent numpy computations on hand-made batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iwsft.core import objectives as obj
from iwsft.core.objectives import ObjectiveConfig

RNG = np.random.default_rng(0)


def batch(b=6, t=7):
  lengths = np.array([7, 3, 5, 1, 7, 2][:b])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  logp = RNG.normal(-1.0, 0.5, (b, t)).astype(np.float32)
  lq = RNG.normal(-1.0, 0.5, (b, t)).astype(np.float32)
  lref = RNG.normal(-1.0, 0.5, (b, t)).astype(np.float32)
  return logp, lq, lref, mask, lengths


def np_seq_weights(lq, lref, mask, temp, lo, hi, self_norm, valid):
  """The authors' episode weight, computed directly: exp(temp * mean_t(lq - lref)), clipped."""
  w = []
  for i in range(len(mask)):
    k = int(mask[i].sum())
    r = (lq[i, :k] - lref[i, :k]).sum() / k
    w.append(min(max(np.exp(temp * np.float64(r)), lo), hi) if valid[i] else 0.0)
  w = np.array(w)
  if self_norm:
    w = w * valid.sum() / w.sum()
  return w


@pytest.mark.parametrize("self_norm", [True, False])
@pytest.mark.parametrize("temp,hi", [(1.0, 1000.0), (10.0, 3.0), (10.0, 1000.0)])
def test_sequence_weights_match_numpy(self_norm, temp, hi):
  _, lq, lref, mask, _ = batch()
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  cfg = ObjectiveConfig("sequence", temperature=temp, w_max=hi, self_normalise=self_norm)
  w, diag = obj.sequence_weights(
    jnp.asarray(lq), jnp.asarray(lref), jnp.asarray(mask), jnp.asarray(valid), cfg
  )
  expected = np_seq_weights(lq, lref, mask, temp, 0.0, hi, self_norm, valid)
  np.testing.assert_allclose(np.asarray(w), expected, rtol=2e-5)
  raw = np_seq_weights(lq, lref, mask, temp, 0.0, np.inf, False, valid)
  np.testing.assert_allclose(
    float(diag["iw/clip_fraction"]), np.sum((raw > hi) & (valid > 0)) / valid.sum(), rtol=1e-6
  )
  np.testing.assert_allclose(
    float(diag["iw/ess_fraction"]),
    expected.sum() ** 2 / (expected**2).sum() / valid.sum(),
    rtol=1e-5,
  )


def test_weights_clip_both_ends():
  lq = np.array([[5.0], [-5.0], [0.1]], np.float32)
  lref = np.zeros_like(lq)
  mask = np.ones_like(lq)
  cfg = ObjectiveConfig("sequence", temperature=1.0, w_min=0.5, w_max=2.0, self_normalise=False)
  w, diag = obj.sequence_weights(lq, lref, mask, jnp.ones(3), cfg)
  np.testing.assert_allclose(np.asarray(w), [2.0, 0.5, np.exp(0.1)], rtol=1e-6)
  np.testing.assert_allclose(float(diag["iw/clip_fraction"]), 2 / 3, rtol=1e-6)


def test_self_normalised_weights_have_mean_one_and_survive_huge_ratios():
  lq = np.array([[300.0], [299.0], [0.0]], np.float32)  # exp(3000) overflows float64 as well
  lref = np.zeros_like(lq)
  cfg = ObjectiveConfig("sequence", temperature=10.0, w_max=1e30, self_normalise=True)
  w, _ = obj.sequence_weights(lq, lref, np.ones_like(lq), jnp.ones(3), cfg)
  chex.assert_tree_all_finite(w)
  np.testing.assert_allclose(float(jnp.mean(w)), 1.0, rtol=1e-5)


def test_step_weights_match_numpy():
  _, lq, lref, mask, _ = batch()
  cfg = ObjectiveConfig("step", temperature=10.0, step_w_min=0.0, step_w_max=2.0)
  w, _ = obj.step_weights(lq, lref, mask, cfg)
  expected = np.clip(np.exp(10.0 * (lq.astype(np.float64) - lref)), 0.0, 2.0) * mask
  np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=1e-30)


def test_step_weights_with_the_authors_normalisation_match_numpy():
  """Divided by their sum over all B x T entries, where each padding entry counts exp(0) = 1."""
  _, lq, lref, mask, _ = batch()
  cfg = ObjectiveConfig("step", temperature=10.0, step_w_max=2.0, step_normalise=True)
  w, _ = obj.step_weights(lq, lref, mask, cfg)
  raw = np.clip(np.exp(10.0 * (lq.astype(np.float64) - lref)), 0.0, 2.0)
  total = (raw * mask).sum() + (1 - mask).sum()
  np.testing.assert_allclose(np.asarray(w), raw * mask / total, rtol=1e-5, atol=1e-30)


def np_loss(logp, mask, seq_w, step_w, length_normalise, valid):
  per = []
  for i in range(len(mask)):
    k = int(mask[i].sum())
    s = (logp[i, :k] * (1.0 if step_w is None else step_w[i, :k])).sum()
    per.append(s / k if length_normalise else s)
  per = np.array(per)
  return -(seq_w * per).sum() / valid.sum()


@pytest.mark.parametrize("length_normalise", [True, False])
def test_weighted_nll_matches_numpy(length_normalise):
  logp, lq, lref, mask, _ = batch()
  seq_w = np.array([0.5, 2.0, 1.0, 0.0, 1.5, 1.0], np.float32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)  # row 3: real data whose weight is 0
  step_w = RNG.uniform(0, 2, logp.shape).astype(np.float32)
  cfg = ObjectiveConfig(length_normalise=length_normalise)
  for sw in (None, step_w):
    got = obj.weighted_nll(logp, mask, seq_w * valid, sw, cfg, valid)
    np.testing.assert_allclose(
      float(got), np_loss(logp, mask, seq_w * valid, sw, length_normalise, valid), rtol=1e-5
    )


def test_token_mean_reduction_matches_numpy():
  logp, _, _, mask, _ = batch()
  seq_w = np.array([0.5, 2.0, 1.0, 0.0, 1.5, 1.0], np.float32)
  valid = np.ones(len(mask), np.float32)
  cfg = ObjectiveConfig(reduction="token_mean")
  got = obj.weighted_nll(logp, mask, seq_w, None, cfg, valid)
  tokens = mask.sum()  # a real row with weight 0 still counts its tokens
  np.testing.assert_allclose(float(got), -(seq_w[:, None] * mask * logp).sum() / tokens, rtol=1e-5)


def test_iw_sft_equals_sft_when_q_is_reference():
  logp, _, lref, mask, _ = batch()
  weight = np.ones(len(mask), np.float32)
  sft, _ = obj.iw_sft_loss(logp, None, None, mask, weight, ObjectiveConfig("none"))
  for mode in ("sequence", "step"):
    cfg = ObjectiveConfig(mode, temperature=10.0, step_w_min=0.0, step_w_max=2.0)
    iw, m = obj.iw_sft_loss(logp, lref, lref, mask, weight, cfg)
    np.testing.assert_allclose(float(iw), float(sft), rtol=1e-6)
    np.testing.assert_allclose(float(m["iw/max_weight"]), 1.0, rtol=1e-6)


def test_gradient_is_the_weighted_bc_gradient():
  """d loss / d logp[i,t] = -w_i mask[i,t] / (len_i · n): the weights carry no gradient."""
  logp, lq, lref, mask, lengths = batch()
  weight = np.ones(len(mask), np.float32)
  cfg = ObjectiveConfig("sequence", temperature=10.0, w_max=1000.0, self_normalise=True)
  grad = jax.grad(lambda lp: obj.iw_sft_loss(lp, lq, lref, mask, weight, cfg)[0])(jnp.asarray(logp))
  w = np_seq_weights(lq, lref, mask, 10.0, 0.0, 1000.0, True, weight)
  expected = -w[:, None] * mask / lengths[:, None] / len(mask)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-5, atol=1e-7)


def test_gradient_does_not_flow_through_q_when_q_is_the_policy():
  logp, _, lref, mask, _ = batch()
  weight = np.ones(len(mask), np.float32)
  cfg = ObjectiveConfig("sequence", temperature=1.0)
  f = lambda lp: obj.iw_sft_loss(lp, jax.lax.stop_gradient(lp), lref, mask, weight, cfg)[0]
  w, _ = obj.sequence_weights(logp, lref, mask, weight, cfg)
  g_manual = jax.grad(lambda lp: obj.weighted_nll(lp, mask, w, None, cfg, weight))(
    jnp.asarray(logp)
  )
  np.testing.assert_allclose(
    np.asarray(jax.grad(f)(jnp.asarray(logp))), np.asarray(g_manual), rtol=1e-6
  )


def test_bound_estimates_match_numpy_and_iw_bound_is_tight_at_q_equals_theta():
  logp, _, lref, mask, lengths = batch()
  reward = np.ones(len(mask), np.float32)
  cfg = ObjectiveConfig()
  b = obj.bound_estimates(logp, logp, lref, mask, reward, cfg)
  l_t = (logp * mask).sum(1) / lengths
  l_r = (lref * mask).sum(1) / lengths
  np.testing.assert_allclose(float(b["bound/sft"]), np.mean(1 + l_t - l_r), rtol=1e-5)
  # q = π_θ: the iw bound equals E[p_θ/π_ref], the objective itself; x >= 1 + log x makes it >= the
  # SFT bound.
  np.testing.assert_allclose(float(b["bound/iw_sft"]), np.mean(np.exp(l_t - l_r)), rtol=1e-5)
  assert float(b["bound/iw_sft"]) >= float(b["bound/sft"])


def test_padding_rows_do_not_count():
  logp, lq, lref, mask, _ = batch()
  weight = np.array([1, 1, 1, 1, 1, 0], np.float32)
  cfg = ObjectiveConfig("sequence", temperature=10.0)
  full, _ = obj.iw_sft_loss(logp, lq, lref, mask, weight, cfg)
  part, _ = obj.iw_sft_loss(logp[:5], lq[:5], lref[:5], mask[:5], weight[:5], cfg)
  np.testing.assert_allclose(float(full), float(part), rtol=1e-6)


def test_an_underflowed_weight_does_not_rescale_the_loss():
  """One episode whose tempered log-ratio is -200 gets weight exp(-200) = 0 in float32; the loss
  still averages over all 6 real episodes (numpy in float64, where that weight is ~1e-87)."""
  logp, lq, lref, mask, lengths = batch()
  lq = lq.copy()
  lq[2] = lref[2] - 20.0 * mask[2]  # mean log-ratio -20, times temperature 10
  weight = np.ones(len(mask), np.float32)
  cfg = ObjectiveConfig("sequence", temperature=10.0, self_normalise=False)
  loss, _ = obj.iw_sft_loss(logp, lq, lref, mask, weight, cfg)
  ratio = ((lq - lref).astype(np.float64) * mask).sum(1) / lengths
  w = np.clip(np.exp(10.0 * ratio), 0.0, 1000.0)
  assert w[2] < 1e-80
  ell = (logp.astype(np.float64) * mask).sum(1) / lengths
  np.testing.assert_allclose(float(loss), -(w * ell).sum() / len(mask), rtol=1e-5)


def test_config_rejects_bad_settings():
  for kwargs in (
    {"importance_weighting": "x"},
    {"w_min": 2.0, "w_max": 1.0},
    {"temperature": 0.0},
    {"reduction": "sum"},
    {"step_w_min": -1.0},
  ):
    with pytest.raises(ValueError):
      ObjectiveConfig(**kwargs)


@pytest.mark.parametrize("missing", ["logp_q", "logp_ref"])
def test_weighting_without_aux_logprobs_is_a_clear_error(missing):
  """Weighting on with q's or π_ref's log-probs missing names what is missing."""
  logp = jnp.zeros((2, 3))
  args = {"logp_q": logp, "logp_ref": logp, missing: None}
  with pytest.raises(ValueError, match=f"{missing} is None"):
    cfg = ObjectiveConfig(importance_weighting="sequence")
    obj.iw_sft_loss(logp, args["logp_q"], args["logp_ref"], jnp.ones((2, 3)), jnp.ones(2), cfg)


def test_token_logprobs_against_numpy():
  """token_logprobs picks log softmax(logits)[target], computed in float64 numpy."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  x = logits.astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  want = np.take_along_axis(x, targets[..., None], -1)[..., 0] - lse
  got = obj.token_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets)
  np.testing.assert_allclose(got, want, atol=3e-2)
  np.testing.assert_allclose(obj.token_logprobs(logits, targets), want, rtol=1e-5, atol=1e-5)
