"""The bound check (lm/tightness.py): its per-sample terms against closed forms on an enumerable
toy distribution, its log-likelihoods against numpy, and its experiment end to end."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from conftest import LM_TINY
from flax import nnx

from iwsft.lm import tightness

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _toy(seed=0, n=12):
  """Three distributions over n 'sequences' and a 0/1 reward, as log-probabilities."""
  rng = np.random.default_rng(seed)
  logs = [np.log(p) for p in rng.dirichlet(np.ones(n), size=3)]
  reward = (rng.random(n) < 0.4).astype(np.float64)
  reward[0] = 1.0
  return (*logs, reward)


def test_the_terms_average_under_pi_ref_to_the_closed_form_bounds_below_j():
  for seed in range(20):
    l_ref, l_theta, l_q, r = _toy(seed)
    p_ref, p_theta, p_q = np.exp(l_ref), np.exp(l_theta), np.exp(l_q)
    terms = tightness.bound_terms(r, l_theta, l_q, l_ref)
    expect = lambda k: float(np.sum(p_ref * terms[k]))  # the exact E_{π_ref} of each term
    j = float(np.sum(p_theta * r))
    sft = float(np.sum(p_ref * r * (1 + np.log(p_theta / p_ref))))
    iw = float(np.sum(p_q * r * (1 + np.log(p_theta / p_q))))  # E_{π_ref}[q/π_ref ·] = E_q[·]
    np.testing.assert_allclose(
      [expect("bound_sft"), expect("bound_iw"), expect("is_estimate")], [sft, iw, j], rtol=1e-12
    )
    assert sft <= j + 1e-12 and iw <= j + 1e-12
    np.testing.assert_allclose(expect("kl_ref_theta"), np.sum(p_ref * np.log(p_ref / p_theta)))


def test_with_q_equal_to_theta_the_iw_bound_is_j_and_with_q_equal_to_pi_ref_the_sft_bound():
  l_ref, l_theta, _, r = _toy(3)
  p_ref = np.exp(l_ref)
  at_theta = tightness.bound_terms(r, l_theta, l_theta, l_ref)
  np.testing.assert_allclose(np.sum(p_ref * at_theta["bound_iw"]), np.sum(np.exp(l_theta) * r))
  at_ref = tightness.bound_terms(r, l_theta, l_ref, l_ref)
  np.testing.assert_allclose(at_ref["bound_iw"], at_ref["bound_sft"])


def test_sequence_logprobs_sum_the_completion_tokens_log_softmax_in_numpy():
  from iwsft.lm.model import LMConfig, Transformer

  model = Transformer(
    LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16), rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 200, (5, 16)).astype(np.int32)
  mask = np.zeros((5, 16), np.float32)
  for i, (a, b) in enumerate([(4, 9), (2, 16), (7, 8), (1, 5), (10, 12)]):
    mask[i, a:b] = 1.0
  got = tightness.sequence_logprobs(graphdef, params, {"tokens": tokens, "mask": mask}, batch=2)
  logits = np.asarray(model(jax.numpy.asarray(tokens)), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0] - logz[:, :-1]
  want = (logp * mask[:, 1:]).sum(1)
  chex.assert_shape(got, (5,))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_the_bound_experiment_runs_and_at_pi_ref_both_bounds_are_its_success_rate(tmp_path):
  work = tmp_path / "bvj"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "experiments", "bound_vs_j.py"),
    f"--workdir={work}",
    "--points=0,10,20",
    "--bound_prompts=64",
    "--j_prompts=32",
    "--config.reference.steps=300",
    "--config.checkpoint_every=0",
    *LM_TINY,
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  for method in ("sft", "iw_sft"):
    rows = json.load(open(work / "seed_0" / f"bounds_{method}.json"))
    assert [row["step"] for row in rows] == [0, 10, 20]
    first = rows[0]
    np.testing.assert_allclose(
      [first["bound_sft"], first["bound_iw"], first["iw_minus_sft"], first["kl_ref_theta"]],
      [first["is_estimate"], first["is_estimate"], 0.0, 0.0],
      atol=1e-12,
    )
    assert all(
      row["bound_sft"] <= row["J"] + 4 * (row["J_se"] + row["bound_sft_se"]) for row in rows
    )
  assert (work / "bounds.png").stat().st_size > 0
  assert "iw_minus_sft" in (work / "table.md").read_text()
  with open(work / "bounds.csv") as f:
    csv_rows = list(csv.DictReader(f))
  for row in csv_rows:
    j, b, jse, bse = (float(row[k]) for k in ("J", "bound_sft", "J_se", "bound_sft_se"))
    np.testing.assert_allclose(float(row["J_minus_sft"]), j - b, atol=1e-9)
    np.testing.assert_allclose(float(row["J_minus_sft_se"]), (jse**2 + bse**2) ** 0.5, atol=1e-9)


def _tiny_lm():
  from iwsft.lm.model import LMConfig, Transformer

  cfg = LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=12)
  return Transformer(cfg, rngs=nnx.Rngs(1))


def _numpy_logprobs(model, tokens, temperature):
  logits = np.asarray(model(jax.numpy.asarray(tokens)), np.float64)[:, :-1] / temperature
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0] - logz
  return np.pad(picked, ((0, 0), (1, 0)))


def test_pi_ref_at_a_temperature_is_log_softmax_of_the_scaled_logits_in_the_update():
  import optax

  from iwsft.core.objectives import ObjectiveConfig
  from iwsft.core.state import init_state
  from iwsft.core.step import make_update
  from iwsft.lm.model import make_logprob_fn

  model = _tiny_lm()
  graphdef, params = nnx.split(model)
  tokens = np.random.default_rng(0).integers(3, 200, (4, 12)).astype(np.int32)
  for chunk in (0, 4):  # the whole logits, and the chunked path
    g = graphdef if not chunk else nnx.split(_chunked(model, chunk))[0]
    got = np.asarray(make_logprob_fn(g, temperature=0.7)(params, {"tokens": tokens}))
    np.testing.assert_allclose(got, _numpy_logprobs(model, tokens, 0.7), atol=2e-5)
  mask = np.zeros((4, 12), np.float32)
  mask[:, 5:] = 1.0
  batch = {"tokens": tokens, "mask": mask, "weight": np.ones(4, np.float32)}
  objective = ObjectiveConfig("sequence", temperature=1.0, w_max=16.0, self_normalise=False)
  state = init_state(params, optax.adam(1e-2), 0, keep_q=False)
  tempered = make_update(
    make_logprob_fn(graphdef),
    optax.adam(1e-2),
    dataclasses.replace(objective, q_decay=0.0),
    ref_logprob_fn=make_logprob_fn(graphdef, temperature=0.7),
  )
  given = make_update(
    make_logprob_fn(graphdef), optax.adam(1e-2), dataclasses.replace(objective, q_decay=0.0)
  )
  ref = _numpy_logprobs(model, tokens, 0.7).astype(np.float32)
  a, ma = jax.jit(tempered)(state, batch)
  b, mb = jax.jit(given)(state, {**batch, "logp_ref": ref})
  np.testing.assert_allclose(ma["iw/mean_log_ratio"], mb["iw/mean_log_ratio"], rtol=1e-5)
  assert abs(float(ma["iw/mean_log_ratio"])) > 0.1  # at temperature 1 it would be 0 (q = θ = π_ref)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _chunked(model, chunk):
  import dataclasses as dc

  from iwsft.lm.model import Transformer

  cfg = dc.replace(model.cfg, logits_chunk=chunk)
  return nnx.merge(
    nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0], nnx.state(model)
  )
