"""bfloat16 parameters (model.param_dtype): the model computes what the float32 model computes
with its parameters rounded to bfloat16 (numpy), checkpoints load rounded, and the language
pipeline trains, saves and reloads them."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from conftest import LM_TINY
from flax import nnx

from iwsft.io import checkpoint
from iwsft.lm import checkpoints
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny-llama")
CFG = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=16)
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
bf16 = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)


def test_bfloat16_parameters_compute_as_their_rounded_float32_values():
  for positions in ("learned", "rope"):
    cfg = LMConfig(**{**CFG.__dict__, "positions": positions})
    g32, p32 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    low = LMConfig(**{**cfg.__dict__, "param_dtype": "bfloat16"})
    g16, p16 = nnx.split(Transformer(low, rngs=nnx.Rngs(0)))
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    nnx.replace_by_pure_dict(p16, jax.tree.map(bf16, nnx.to_pure_dict(p32)))
    rounded = jax.tree.map(lambda x: bf16(x).astype(np.float32), p32)
    want = make_logprob_fn(g32)(rounded, {"tokens": TOKENS})
    np.testing.assert_array_equal(make_logprob_fn(g16)(p16, {"tokens": TOKENS}), want)


def test_a_checkpoint_loads_as_bfloat16_parameters():
  _, _, p32 = checkpoints.load_hf(FIXTURE, max_len=64)
  cfg, _, p16 = checkpoints.load_hf(FIXTURE, max_len=64, param_dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), bf16(b))


def test_the_language_pipeline_trains_bfloat16_parameters(tmp_path):
  """π_ref trained, then iw-SFT on records of your own (so no sampling luck is involved)."""
  from iwsft.lm.task import worked_solution

  work, data = tmp_path / "bf16", tmp_path / "mine.jsonl"
  records = [
    {"prompt": f"{a}+{b}=", "completion": worked_solution(a, b, 1)}
    for a in range(4)
    for b in (3, 7)
  ]
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  flags = [
    *LM_TINY,
    "--config.model.param_dtype=bfloat16",
    "--config.task.demos=64",
    "--config.reference.steps=20",
    "--config.task.eval_problems=8",
    "--config.finetune.steps=10",
    "--config.methods=iw_sft",
    f"--config.data={data}",
    "--config.stages=reference",
    "--config.stages=finetune",
  ]
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "lm.py"), f"--workdir={work}", *flags]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=48, param_dtype="bfloat16")
  template = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
  seed = work / "seed_0"
  ref = checkpoint.restore_state(str(seed / "reference" / "params"), template)
  tuned = checkpoint.restore_state(str(seed / "iw_sft" / "params"), template)
  assert {x.dtype for x in jax.tree.leaves(tuned)} == {jnp.dtype(jnp.bfloat16)}
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(tuned)))
