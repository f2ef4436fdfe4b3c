"""make_optimizer against Adam(W) written out in numpy; Adam's moments in a type of their own."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iwsft.core.config import StageConfig, make_optimizer
from iwsft.errors import UserError


def _numpy_adamw(params, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
  """Updates of Adam(W) (decay on matrices only) for a list of gradient trees, in float64."""
  m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x, np.float64) for k, x in params.items()}
  p = {k: np.asarray(x, np.float64) for k, x in params.items()}
  out = []
  for t, g in enumerate(grads, 1):
    step = {}
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk**2
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      if p[k].ndim >= 2:
        u = u + wd * p[k]
      step[k] = -lr * u
      p[k] = p[k] + step[k]
    out.append(step)
  return out


def _problem(dtype):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
  grads = [{k: rng.normal(size=x.shape) for k, x in params.items()} for _ in range(3)]
  as_jax = lambda tree: {k: jnp.asarray(x, dtype) for k, x in tree.items()}
  return params, grads, as_jax


def _run(opt, params, grads):
  state, steps = opt.init(params), []
  for g in grads:
    u, state = opt.update(g, state, params)
    params = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, u)
    steps.append(u)
  return steps, state


def test_adamw_matches_numpy():
  params, grads, as_jax = _problem(jnp.float32)
  stage = StageConfig(steps=10, learning_rate=1e-2, weight_decay=0.1, adam_b2=0.95)
  got, _ = _run(make_optimizer(stage), as_jax(params), [as_jax(g) for g in grads])
  want = _numpy_adamw(params, grads, 1e-2, b2=0.95, wd=0.1)
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-5, atol=1e-7)


def test_float32_moments_beside_bfloat16_parameters():
  """moment_dtype float32: the state is float32, the updates bfloat16, and each equals Adam in
  float32 on the bfloat16 values, rounded to bfloat16."""
  params, grads, as_jax = _problem(jnp.bfloat16)
  p16, g16 = as_jax(params), [as_jax(g) for g in grads]
  stage = StageConfig(steps=10, learning_rate=1e-2, moment_dtype="float32")
  got, state = _run(make_optimizer(stage), p16, g16)
  moments = [x for x in jax.tree.leaves(state) if x.ndim >= 1]
  assert moments and all(x.dtype == jnp.float32 for x in moments)
  chex.assert_trees_all_equal_dtypes(got[0], p16)
  bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)
  m = {k: 0.0 for k in params}
  v = {k: 0.0 for k in params}
  p = {k: bf16(x) for k, x in params.items()}
  for t, (g, u) in enumerate(zip(g16, got), 1):  # float32-exact moments, bfloat16 parameters
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m[k] = 0.9 * m[k] + 0.1 * gk
      v[k] = 0.999 * v[k] + 0.001 * gk**2
      want = bf16(-1e-2 * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8))
      np.testing.assert_allclose(np.asarray(u[k], np.float64), want, rtol=1e-2, atol=1e-6)
      p[k] = bf16(p[k] + want)
  _, state16 = _run(make_optimizer(StageConfig(steps=10, learning_rate=1e-2)), p16, g16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state16) if x.ndim >= 1)


def test_an_unknown_moment_type_is_a_user_error():
  with pytest.raises(UserError, match="moment_dtype must be"):
    StageConfig(moment_dtype="float16")
