"""Long sequences: chunked and fused attention, rematerialised blocks and chunked log-probs give
the model's function and gradients, and their memory (XLA's own analysis of the compiled
backward pass) grows linearly in the sequence length instead of quadratically."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QWEN2_LIKE, lm_command_error
from flax import nnx

from iwsft.lm.model import LMConfig, Transformer, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = {  # Qwen2-like and the byte-level model's (learned positions)
  "qwen2": QWEN2_LIKE,
  "learned": dict(positions="learned"),
}
COMPUTE = {
  "chunked attention": dict(attention="chunked", attention_chunk=8),
  "dot_product attention": dict(attention="dot_product"),
  "splash attention": dict(attention="splash"),  # Pallas's interpret mode off TPU
  "remat full": dict(remat="full"),
  "remat dots": dict(remat="dots"),
  "chunked log-probs": dict(logits_chunk=7),
  "all together": dict(attention="chunked", attention_chunk=5, remat="full", logits_chunk=10),
}


def _logprobs_and_grads(arch: dict, **compute):
  cfg = LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=40, **arch)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.split(Transformer(dataclasses.replace(cfg, **compute), rngs=nnx.Rngs(0)))[0]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 37)))  # 36: not a multiple
  f = lambda p: token_logprobs(nnx.merge(graphdef, p), tokens)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 37)), jnp.float32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(weights * f(p))))(params)
  return np.asarray(jax.jit(f)(params)), grads


# in the default run; the single paths (splash's too: test_lm_packing runs it by default) run
# in make test-slow
DEFAULT_RUN = {(a, c) for a in ARCHS for c in ("all together", "dot_product attention")}
CASES = [
  pytest.param(a, c, marks=() if (a, c) in DEFAULT_RUN else pytest.mark.slow, id=f"{a}-{c}")
  for a in ARCHS
  for c in COMPUTE
]


@pytest.mark.parametrize("arch,compute", CASES)
def test_long_sequence_paths_compute_the_same_logprobs_and_gradients(arch, compute):
  want, want_grads = _logprobs_and_grads(ARCHS[arch])
  got, got_grads = _logprobs_and_grads(ARCHS[arch], **COMPUTE[compute])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _temp_bytes(t: int, **compute) -> int:
  """XLA's temporary bytes for the gradient of the log-probs of one sequence of t tokens."""
  cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=t + 1)
  cfg = dataclasses.replace(cfg, positions="rope", **compute)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, t + 1), jnp.int32)
  grad = jax.grad(lambda p, x: token_logprobs(nnx.merge(graphdef, p), x).sum())
  return jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_chunked_attention_memory_grows_linearly_not_quadratically_in_length():
  """4x the tokens: the full attention's temporaries grow about 16x (its T x T scores), the
  chunked path's (attention, remat and log-probs in chunks of 128) about 4x."""
  chunked = dict(attention="chunked", attention_chunk=128, remat="full", logits_chunk=128)
  full_ratio = _temp_bytes(1024) / _temp_bytes(256)
  chunked_ratio = _temp_bytes(1024, **chunked) / _temp_bytes(256, **chunked)
  assert full_ratio > 10, full_ratio
  assert 3 < chunked_ratio < 5, chunked_ratio
  assert _temp_bytes(1024, **chunked) < _temp_bytes(1024) / 5


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--config.compute.remat=some"], "remat must be one of"),
    (["--config.compute.attention=flash"], "attention must be one of"),
    (["--config.micro_batches=3"], "must divide batch_size"),
    (["--config.compute.attention=cudnn"], "'cudnn' needs a GPU (this backend: cpu)"),
    (["--config.compute.attention=splash"], "'splash' needs a TPU (this backend: cpu)"),
  ],
  ids=["remat", "attention", "micro_batches", "cudnn on CPU", "splash on CPU"],
)
def test_bad_compute_settings_are_one_line_exit_2(tmp_path, args, needle):
  assert needle in lm_command_error(tmp_path / "work", *args)


def test_splash_attention_over_a_mesh_splits_rows_and_heads_and_equals_one_device():
  """8 forced devices, data × fsdp × model = 2 × 2 × 2: splash's kernel runs per device on its
  rows and heads (no all-gather in the attention's compiled backward pass; the kernel called
  whole gathers its inputs) with the plain attention's value and gradients, the same kernel
  shape still works outside the mesh context, and the LM update under splash equals one
  device's."""
  script = os.path.join(ROOT, "tests", "helpers", "splash_mesh_script.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, script], capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["devices"] == 8
  att = r["attention"]
  assert att["all_gathers"] == 0 and att["all_gathers_unpartitioned"] > 0
  assert att["value_diff"] < 1e-3 and att["grad_diff"] < 1e-5 and att["outside_diff"] < 1e-3
  assert r["update_splits"] and all(s == [["data", "fsdp"], "model"] for s in r["update_splits"])
  np.testing.assert_allclose(r["loss"], r["loss_one"], rtol=1e-5)
  assert r["max_param_diff"] < 1e-5
