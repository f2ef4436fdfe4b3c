"""Scanned blocks (model.scan_layers): the stacked model is the per-layer model's function — the
same parameters stacked at the same seed, log-probs, gradients and KV-cache decoding within float
reassociation — on the Qwen2-like and byte-level architectures, with remat and chunked paths and
LoRA; train_layers holds the lower layers of stacked leaves; a checkpoint exports and reloads
across the two layouts; and with remat the compiled backward pass's temporaries stay flat as
blocks are added (XLA's memory analysis)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import QWEN2_LIKE
from flax import nnx

from iwsft.core.config import StageConfig
from iwsft.lm import checkpoints, lora, stages
from iwsft.lm.model import (
  LMConfig,
  Transformer,
  make_logprob_fn,
  stack_blocks,
  stacked,
  token_logprobs,
)

ARCHS = {  # Qwen2-like and the byte-level model's (learned positions)
  "qwen2": QWEN2_LIKE,
  "learned": dict(positions="learned"),
}
COMPUTE = {
  "plain": {},
  "remat + chunked": dict(remat="full", attention="chunked", attention_chunk=8, logits_chunk=9),
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 29)))
WEIGHTS = jnp.asarray(np.random.default_rng(1).normal(size=(3, 29)), jnp.float32)


def _models(arch: str, n_layers: int = 3, **compute):
  """(per-layer model, scanned model), both at seed 0."""
  cfg = LMConfig(
    vocab_size=50, d_model=32, n_layers=n_layers, n_heads=4, d_ff=64, max_len=40, **ARCHS[arch]
  )
  make = lambda scan: Transformer(
    dataclasses.replace(cfg, scan_layers=scan, **compute), rngs=nnx.Rngs(0)
  )
  return make(False), make(True)


def _pure(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _grads(model):
  graphdef, params = nnx.split(model)
  f = lambda p: jnp.sum(WEIGHTS * token_logprobs(nnx.merge(graphdef, p), TOKENS))
  return nnx.to_pure_dict(jax.jit(jax.grad(f))(params))


def _assert_close(got: dict, want: dict, rel: float = 1e-5):
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=rel * scale)


DEFAULT_RUN = {("qwen2", "remat + chunked"), ("learned", "plain")}  # the others: make test-slow
CASES = [
  pytest.param(a, c, marks=() if (a, c) in DEFAULT_RUN else pytest.mark.slow, id=f"{a}-{c}")
  for a in ARCHS
  for c in COMPUTE
]


@pytest.mark.parametrize("arch,compute", CASES)
def test_the_scanned_model_is_the_per_layer_model_stacked(arch, compute):
  blocks, scanned = _models(arch, **COMPUTE[compute])
  got = _pure(scanned)
  assert set(got["blocks"]) == {"norm1", "qkv", "proj", "norm2", "up", "down"}
  assert got["blocks"]["qkv"]["kernel"].shape[0] == 3
  want = stack_blocks(_pure(blocks))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)  # the same draws, stacked
  np.testing.assert_allclose(
    token_logprobs(scanned, TOKENS), token_logprobs(blocks, TOKENS), rtol=1e-5, atol=1e-5
  )
  _assert_close(_grads(scanned), stack_blocks(_grads(blocks)))


def test_kv_cache_decoding_of_the_scanned_model_equals_the_per_layer_model():
  blocks, scanned = _models("qwen2")
  (la, ca), (lb, cb) = blocks.prefill(TOKENS[:, :10]), scanned.prefill(TOKENS[:, :10])
  np.testing.assert_allclose(lb, la, atol=1e-5)
  for pos in range(10, 14):
    (la, ca), (lb, cb) = (
      blocks.decode(TOKENS[:, pos], ca, pos),
      scanned.decode(TOKENS[:, pos], cb, pos),
    )
    np.testing.assert_allclose(lb, la, atol=1e-5)
    np.testing.assert_allclose(cb["k"], ca["k"], atol=1e-5)
    assert cb["k"].shape == (3, 3, 2, 40, 8)  # [layers, B, K, max_len, Dh]


def test_lora_on_scanned_blocks_merges_per_layer_as_the_per_layer_model():
  """Adapters (B no longer zero) on both layouts, the same values: the scanned model's log-probs
  and lora.merge are the per-layer model's, stacked."""
  blocks, _ = _models("qwen2")
  cfg = lora.with_lora(blocks.cfg, 2, 8.0, ("qkv", "proj", "up", "down"))
  split = lambda scan: nnx.split(
    Transformer(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0)), nnx.LoRAParam, ...
  )
  graph_b, adapters, base = split(False)
  rng = np.random.default_rng(2)
  adapters = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), adapters)
  graph_s, s_adapters, s_base = split(True)
  nnx.replace_by_pure_dict(s_adapters, stack_blocks(nnx.to_pure_dict(adapters)))
  nnx.replace_by_pure_dict(s_base, stack_blocks(nnx.to_pure_dict(base)))
  want = token_logprobs(nnx.merge(graph_b, adapters, base), TOKENS)
  got = token_logprobs(nnx.merge(graph_s, s_adapters, s_base), TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged = nnx.to_pure_dict(lora.merge(graph_s, s_adapters, s_base))
  _assert_close(merged, stack_blocks(nnx.to_pure_dict(lora.merge(graph_b, adapters, base))))


def test_train_layers_holds_the_lower_layers_of_stacked_leaves():
  """Top 1 of 3 blocks trained: the gradient of a stacked leaf is the per-layer model's for its
  top layer and zero below."""
  blocks, scanned = _models("learned")
  grads = {}
  for name, model in (("blocks", blocks), ("scanned", scanned)):
    graphdef, params = nnx.split(model)
    f = make_logprob_fn(graphdef, n_layers=3, train_layers=1)
    grads[name] = nnx.to_pure_dict(
      jax.grad(lambda p: jnp.sum(WEIGHTS * f(p, {"tokens": TOKENS})))(params)
    )
  g = grads["scanned"]["blocks"]["qkv"]["kernel"]
  assert not np.any(g[:2]) and np.any(g[2])
  want = grads["blocks"]["blocks"][2]["qkv"]["kernel"]
  np.testing.assert_allclose(g[2], want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
  assert stacked(("blocks", "qkv", "kernel")) and not stacked(("blocks", 0, "qkv", "kernel"))


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_train_layers_optimiser_updates_the_top_layer_as_adamw_and_keeps_no_state_below(scan):
  """Top 1 of 3 blocks trained by the stage's AdamW (lr 0.1, decay 0.1), one step on gradients
  of ones, in either layout: the top layer moves by AdamW's closed-form first step, −lr·(1 +
  decay·w) for its matrices and −lr for its norms and biases (a stacked norm [3, d] is not a
  matrix); the lower layers, the embedding and positions stay exactly; Adam's moments hold the
  top layer and the final norm only (two copies of their elements)."""
  model = _models("learned")[scan]
  params = nnx.state(model, nnx.Param)
  ctx = types.SimpleNamespace(model=types.SimpleNamespace(mcfg=model.cfg, init_params=params))
  stage = StageConfig(steps=1, batch_size=1, learning_rate=0.1, weight_decay=0.1)
  opt = stages._optimizer(ctx, stage, train_layers=1)
  state = opt.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(opt.update)(ones, state, params)
  new = nnx.to_pure_dict(optax.apply_updates(params, updates))
  old = nnx.to_pure_dict(params)
  layer = (
    (lambda t, i: t["blocks"][i])
    if not scan
    else (lambda t, i: jax.tree.map(lambda x: x[i], t["blocks"]))
  )
  for i in (0, 1):
    for a, b in zip(jax.tree.leaves(layer(new, i)), jax.tree.leaves(layer(old, i)), strict=True):
      np.testing.assert_array_equal(a, b)
  top_new, top_old = layer(new, 2), layer(old, 2)
  for keys in (("qkv", "kernel"), ("up", "kernel"), ("norm1", "scale")):
    a, w = top_new[keys[0]][keys[1]], np.asarray(top_old[keys[0]][keys[1]])
    want = w - 0.1 * (1 + 0.1 * w) if keys[1] == "kernel" else w - 0.1
    np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(new["embed"]["embedding"], old["embed"]["embedding"])
  np.testing.assert_array_equal(new["pos"], old["pos"])
  trained = sum(x.size for x in jax.tree.leaves(layer(old, 2))) + sum(
    x.size for x in jax.tree.leaves(old["norm"])
  )
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moments == 2 * trained


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_scanned_model_exports_per_layer_and_reloads_in_either_layout(arch, tmp_path):
  """The transformers fixture loaded scanned, exported, and read back per layer and scanned: the
  same values (the scanned load is checked against transformers' logits in test_checkpoints)."""
  path = f"{checkpoints.__file__.rsplit('/iwsft/', 1)[0]}/tests/fixtures/hf/tiny-{arch}"
  cfg, _, params = checkpoints.load_hf(path, max_len=64, scan_layers=True)
  checkpoints.save_hf(str(tmp_path), cfg, params)
  _, _, per_layer = checkpoints.load_hf(str(tmp_path), max_len=64)
  _, _, again = checkpoints.load_hf(str(tmp_path), max_len=64, scan_layers=True)
  want = nnx.to_pure_dict(params)
  for other in (stack_blocks(nnx.to_pure_dict(per_layer)), nnx.to_pure_dict(again)):
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)


def _temp_bytes(n_layers: int) -> int:
  """XLA's temporary bytes for the gradient of one 256-token sequence's log-probs through a
  scanned, rematerialised model of n_layers blocks."""
  cfg = LMConfig(
    vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, d_ff=64, max_len=257,
    positions="rope", remat="full", scan_layers=True,
  )  # fmt: skip
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, 257), jnp.int32)
  grad = jax.grad(lambda p, x: token_logprobs(nnx.merge(graphdef, p), x).sum())
  return jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_scanned_remat_temporaries_stay_flat_as_blocks_are_added():
  """16 blocks instead of 2: the temporaries grow by at most each extra block's saved input
  (1 x 256 x 32 float32 = 32 KiB) and its gradient buffers, not by blocks' activations."""
  two, sixteen = _temp_bytes(2), _temp_bytes(16)
  assert sixteen < 1.5 * two, (two, sixteen)
