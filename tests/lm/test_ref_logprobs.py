"""π_ref's log-probs precomputed once over the fine-tuning pool (precompute_ref) through the
sharded pool path: the pool placed on the mesh, and each row's log-probs those of numpy's
log-softmax of the model's logits at ref_temperature."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iwsft.core.sharding import make_mesh
from iwsft.lm import stages
from iwsft.lm.model import LMConfig, Transformer


@pytest.mark.parametrize("temperature", [pytest.param(1.0, marks=pytest.mark.slow), 0.7])
def test_precomputed_ref_logprobs_are_the_models_log_softmax_per_row(temperature):
  cfg = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=12)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  graphdef, ref = nnx.split(model)
  rng = np.random.default_rng(0)
  n = 21  # not a multiple of the 16 rows pool_logprobs takes at a time
  data = {
    "tokens": rng.integers(0, 40, (n, 12)).astype(np.int32),
    "mask": np.ones((n, 12), np.float32),
    "weight": np.ones(n, np.float32),
  }
  ctx = types.SimpleNamespace(
    mesh=make_mesh(1),
    model=types.SimpleNamespace(graphdef=graphdef),
    settings=types.SimpleNamespace(ref_temperature=temperature),
  )
  out = stages._with_ref_logprobs(ctx, data, ref)
  assert isinstance(out["logp_ref"], jax.Array) and out["logp_ref"].shape[1] == 12
  np.testing.assert_array_equal(np.asarray(out["tokens"])[:n], data["tokens"])
  logits = np.asarray(model(jnp.asarray(data["tokens"])), np.float64) / temperature
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  want = np.take_along_axis(logp[:, :-1], data["tokens"][:, 1:, None], -1)[..., 0]
  got = np.asarray(out["logp_ref"])[:n]
  np.testing.assert_array_equal(got[:, 0], 0.0)
  np.testing.assert_allclose(got[:, 1:], want, rtol=1e-5, atol=1e-5)
