"""Packed LM batches (lm/packing.py): the placement against a plain-Python first-fit, the model's
log-probs and the update's gradients against the padded batch, and no attention across segments."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import lm_command_error
from flax import nnx

from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.state import init_state
from iwsft.core.step import make_update
from iwsft.lm import packing
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T = 24
ARCHS = {  # GQA + RoPE + Qwen2 biases + SwiGLU; learned positions + GELU
  "qwen2": dict(n_heads=4, n_kv_heads=2, positions="rope", qkv_bias=True, mlp="swiglu"),
  "byte": dict(n_heads=2),
}


def _batch(seed=0, b=6, prompt=5):
  """Rows of prompt + completion of mixed lengths, left-aligned, then padding (token 0)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(prompt + 2, T // 2 + 1, b)
  tokens = np.zeros((b, T), np.int32)
  mask = np.zeros((b, T), np.float32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(3, 250, n)
    mask[i, prompt:n] = 1.0
  return {"tokens": tokens, "mask": mask, "weight": np.ones(b, np.float32)}, lengths


def _first_fit(lengths, width):
  row, offset, r, used = [], [], 0, 0
  for n in lengths:
    if used + n > width:
      r, used = r + 1, 0
    row.append(r)
    offset.append(used)
    used += n
  return row, offset, r + 1


def test_plan_pack_unpack_against_plain_python():
  batch, lengths = _batch()
  row, offset, n_rows = _first_fit(lengths, T)
  got_row, got_off, fits = packing.plan(jnp.asarray(lengths, jnp.int32), n_rows, T)
  assert (list(np.asarray(got_row)), list(np.asarray(got_off))) == (row, offset) and bool(fits)
  assert not bool(packing.plan(jnp.asarray(lengths, jnp.int32), n_rows - 1, T)[2])
  np.testing.assert_array_equal(packing.lengths_of(jnp.asarray(batch["mask"])), lengths)
  tokens, segments = packing.pack(jnp.asarray(batch["tokens"]), lengths, got_row, got_off, n_rows)
  want_tokens, want_seg = np.zeros((n_rows, T), np.int32), np.zeros((n_rows, T), np.int32)
  for b, (r, o, n) in enumerate(zip(row, offset, lengths)):
    want_tokens[r, o : o + n] = batch["tokens"][b, :n]
    want_seg[r, o : o + n] = b + 1
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(segments, want_seg)
  back = packing.unpack(tokens.astype(jnp.float32), lengths, got_row, got_off)
  want_back = batch["tokens"].astype(np.float32)
  want_back[:, 0] = 0.0
  np.testing.assert_array_equal(back, want_back)


def _model(arch, **compute):
  cfg = LMConfig(d_model=32, n_layers=2, d_ff=64, max_len=T, **ARCHS[arch], **compute)
  return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "arch,attention",
  [
    *[(a, m) for a in ARCHS for m in ("full", "chunked", "dot_product")],
    ("qwen2", "splash"),
    pytest.param("byte", "splash", marks=pytest.mark.slow),
  ],
)
def test_packed_log_probs_equal_the_padded_ones(arch, attention):
  model = _model(arch, attention=attention, attention_chunk=8)
  graphdef, params = nnx.split(model)
  batch, lengths = _batch(1)
  rows = _first_fit(lengths, T)[2]
  padded = make_logprob_fn(graphdef)(params, batch)
  packed = make_logprob_fn(graphdef, packed_rows=rows)(params, batch)
  chex.assert_trees_all_close(packed * batch["mask"], padded * batch["mask"], atol=1e-5)
  too_few = make_logprob_fn(graphdef, packed_rows=rows - 1)(params, batch)  # computed padded
  chex.assert_trees_all_close(too_few, padded, atol=1e-6)


def test_no_token_attends_across_segments():
  model = _model("qwen2")
  tokens = np.random.default_rng(2).integers(3, 250, (1, T)).astype(np.int32)
  segments = np.repeat(np.array([[1, 2, 3]]), 8, axis=1).astype(np.int32)  # 8 tokens each
  base = token_logprobs(model, jnp.asarray(tokens), segments=jnp.asarray(segments))
  changed = tokens.copy()
  changed[0, 8:16] = (changed[0, 8:16] + 7) % 250 + 3  # segment 2 only
  other = token_logprobs(model, jnp.asarray(changed), segments=jnp.asarray(segments))
  np.testing.assert_array_equal(np.asarray(other)[0, :8], np.asarray(base)[0, :8])
  np.testing.assert_array_equal(np.asarray(other)[0, 17:], np.asarray(base)[0, 17:])
  assert not np.allclose(np.asarray(other)[0, 9:16], np.asarray(base)[0, 9:16])
  alone = token_logprobs(model, jnp.asarray(tokens[:, 16:]))  # segment 3 as its own sequence
  np.testing.assert_allclose(np.asarray(base)[0, 17:], np.asarray(alone)[0, 1:], atol=1e-5)


@pytest.mark.parametrize(
  "objective",
  [
    ObjectiveConfig("none"),
    ObjectiveConfig("sequence", temperature=1.0, w_max=16.0, self_normalise=True, q_decay=0.0),
    ObjectiveConfig("step", step_w_min=0.2, step_w_max=1.8, reduction="token_mean", q_decay=0.5),
    ObjectiveConfig("sequence", reduction="sequence_mean", length_normalise=True, q_decay=0.9),
  ],
  ids=["sft", "iw_sft", "iw_sft_step", "iw_sft_seq_mean"],
)
def test_a_packed_update_equals_the_padded_one(objective):
  graphdef, params = nnx.split(_model("qwen2"))
  batch, lengths = _batch(3)
  rows = _first_fit(lengths, T)[2]
  ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
  out = []
  for packed_rows in (0, rows):
    fn = make_logprob_fn(graphdef, packed_rows=packed_rows)
    update = make_update(fn, optax.sgd(1.0), objective, track_bounds=True)
    state = init_state(params, optax.sgd(1.0), 0, ref)
    out.append(jax.jit(update)(state, batch))
  (a, ma), (b, mb) = out
  chex.assert_trees_all_close(a.params, b.params, atol=1e-5)
  for k in ("loss", "bound/sft", "bound/iw_sft"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6)
  assert rows < len(lengths)  # the packed batch really is smaller


def test_packed_rows_beyond_the_batch_is_a_user_error(tmp_path):
  from iwsft.errors import UserError
  from iwsft.lm.config import get_config
  from iwsft.lm.settings import check_settings

  cfg = get_config()
  cfg.packed_rows = cfg.finetune.batch_size + 1
  with pytest.raises(UserError, match="packed_rows"):
    check_settings(cfg)
  cfg.packed_rows = 8
  assert dataclasses.asdict(check_settings(cfg).finetune)["batch_size"] == 64


def test_packing_per_device_block_equals_the_padded_batch():
  """groups = 2 (two data-parallel devices): each half of the batch packed into rows of its own
  gives the padded log-probs; a half that does not fit makes the whole batch padded, even when
  the batch as a whole would fit in as many rows (the same values either way)."""
  graphdef, params = nnx.split(_model("qwen2"))
  batch, lengths = _batch(2, b=8)
  padded = make_logprob_fn(graphdef)(params, batch)
  rows = 2 * max(_first_fit(lengths[:4], T)[2], _first_fit(lengths[4:], T)[2])
  assert rows < 8
  got = make_logprob_fn(graphdef, packed_rows=rows, packed_groups=2)(params, batch)
  chex.assert_trees_all_close(got * batch["mask"], padded * batch["mask"], atol=1e-5)
  lens = np.array([12, 13, 5, 5])  # first half: 2 rows; second: 1; all four first-fit: 2 rows
  assert _first_fit(lens, T)[2] == 2 and _first_fit(lens[:2], T)[2] == 2
  tokens = np.where(np.arange(T)[None] < lens[:, None], 7, 0).astype(np.int32)
  mask = (np.arange(T)[None] < lens[:, None]).astype(np.float32) * (np.arange(T)[None] >= 2)
  plan = jax.vmap(packing.plan, in_axes=(0, None, None))
  fits = plan(packing.lengths_of(jnp.asarray(mask)).reshape(2, 2), 1, T)[2]
  assert list(np.asarray(fits)) == [False, True]  # so packed_logprobs computes it padded
  small = {"tokens": tokens, "mask": mask, "weight": np.ones(4, np.float32)}
  whole = make_logprob_fn(graphdef, packed_rows=2, packed_groups=2)(params, small)
  chex.assert_trees_all_close(whole, make_logprob_fn(graphdef)(params, small), atol=1e-6)
  with pytest.raises(ValueError, match="packing groups 3 must divide"):
    make_logprob_fn(graphdef, packed_rows=4, packed_groups=3)(params, batch)


def test_packed_rows_not_a_multiple_of_the_data_parallel_devices_is_one_line_exit_2(tmp_path):
  line = lm_command_error(tmp_path / "w", "--config.packed_rows=4", devices=8)
  assert "packed_rows 4 must be a multiple of the 8 data-parallel devices" in line
