"""The authors' s1K run as a preset: its settings are the recipe's, and it fine-tunes a Qwen2-like
pretrained model on trace records end to end (a tiny random one with SmolLM2's tokenizer, with the
long-sequence settings' chunked paths exercised)."""

import json

import numpy as np
from conftest import save_tiny_pretrained

from iwsft.lm.config import get_config


def test_the_preset_is_the_authors_recipe():
  """The numbers of their run (1,000 traces, 5 epochs at 8 sequences a step, 5% warm-up)."""
  c = get_config("s1k")
  f, o = c.finetune, c.objective
  assert (f.steps, f.batch_size, f.warmup_steps) == (5 * 1000 // 8, 8, round(0.05 * 625))
  assert (f.learning_rate, f.schedule, f.weight_decay, f.adam_b2, f.clip_norm) == (
    1e-5,
    "cosine",
    1e-4,
    0.95,
    1.0,
  )
  assert (o.q_decay, o.temperature, o.w_min, o.w_max, o.self_normalise) == (
    0.0,
    1.0,
    0.0,
    16.0,
    False,
  )
  assert (o.step_w_min, o.step_w_max, o.reduction) == (0.2, 1.8, "sequence_mean")
  assert c.precompute_ref and c.model.dtype == "bfloat16" and c.model.max_len == 22_000
  assert c.compute.remat == "full" and set(c.methods) == {"sft", "iw_sft", "iw_sft_step"}


def test_the_preset_fine_tunes_a_pretrained_model_on_traces(tmp_path, smollm2_tokenizer):
  from iwsft.lm.pipeline import run_lm

  model_dir = tmp_path / "qwen2-like"
  save_tiny_pretrained(model_dir, smollm2_tokenizer, max_len=96, qkv_bias=True)
  data = tmp_path / "traces.jsonl"
  traces = [(f"Compute {a} * {b}.", f"Think: {a} * {b} = {a * b}. Answer: {a * b}") for a, b in
            [(12, 3), (7, 8), (21, 4), (5, 5)]]  # fmt: skip
  data.write_text("".join(json.dumps({"prompt": p, "completion": t}) + "\n" for p, t in traces))
  cfg = get_config("s1k")
  cfg.model.update(path=str(model_dir), max_len=96)
  cfg.update(data=str(data), fsdp=1, steps_per_dispatch=2, checkpoint_every=2, methods=("iw_sft",))
  cfg.finetune.update(steps=4, batch_size=2, warmup_steps=1)
  cfg.compute.update(attention_chunk=16, logits_chunk=16)
  run_lm(cfg, str(tmp_path / "run"), quiet=True)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  iw = [r for r in rows if r["stage"] == "iw_sft" and r["kind"] == "train"]
  assert len(iw) == 2 and all(np.isfinite(r["loss"]) for r in iw)
  assert all(0 < r["iw/ess_fraction"] <= 1 + 1e-6 for r in iw)
  assert (tmp_path / "run" / "iw_sft" / "hf" / "model.safetensors").exists()
