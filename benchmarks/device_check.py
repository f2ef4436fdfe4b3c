"""The check a lent GPU (or TPU) is for: the language-model step's memory as the device's own
compiler predicts it (XLA's memory analysis, the number docs/scaling.md sizes the paper's run
with on CPU) against what the device really allocates when the step runs, and its speed.

  python benchmarks/device_check.py --out=DIR                 # on the device: the prepared set
  python benchmarks/device_check.py --cases=tiny --steps=2    # anywhere (the test's smoke run)

Each case compiles the update of benchmarks/lm_step.py on one device (the scanned model, remat
"full", chunked attention and log-probs, bfloat16 compute, one sequence a step), builds a
random state in it and runs warm-up plus --steps timed steps: the compiled analysis (state,
temporaries), the device's peak bytes in use (memory_stats; CPU backends have none), seconds a
step, tokens/s and the model FLOP utilisation against --peak_tflops. Cases: SmolLM2-135M at 2,048
and 8,192 tokens; four Qwen2.5-32B-width blocks at 22,000 tokens (bfloat16 parameters, whole and
LoRA rank 16), which a 141 GB device holds, so the 64-block numbers can be scaled from them;
"dot_product" attention (cuDNN's fused kernel on GPUs) beside the chunked one for SmolLM2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, lm_step  # noqa: E402
from iwsft.core.sharding import make_mesh  # noqa: E402
from iwsft.lm.model import LMConfig  # noqa: E402

LONG = dict(
  dtype="bfloat16", attention="chunked", attention_chunk=1024, remat="full", logits_chunk=1024,
  scan_layers=True,
)  # fmt: skip
QWEN4 = dataclasses.replace(
  common.ARCHITECTURES["qwen2.5-32b"], n_layers=4, param_dtype="bfloat16", **LONG
)
SMOL = dataclasses.replace(common.ARCHITECTURES["smollm2"], **LONG)
CASES = {  # name: (model, tokens)
  "smollm2-2048": (SMOL, 2048),
  "smollm2-8192": (SMOL, 8192),
  "smollm2-8192-dot_product": (dataclasses.replace(SMOL, attention="dot_product"), 8192),
  "qwen32b-width-4-blocks-22000": (QWEN4, 22_000),
  "qwen32b-width-4-blocks-22000-lora16": (dataclasses.replace(QWEN4, lora_rank=16), 22_000),
  "tiny": (LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=65, **LONG), 64),
}


def check(cfg: LMConfig, tokens: int, steps: int, peak_tflops: float) -> dict:
  """One case on the first device: predicted and allocated bytes, seconds a step."""
  cfg = dataclasses.replace(cfg, max_len=tokens + 1)
  mesh = make_mesh(1)
  step, shapes, shardings, opt = lm_step.jitted_step(cfg, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(shapes, lm_step.batch_shapes(1, tokens)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state = lm_step.concrete_state(cfg, opt, shardings)
  batch = lm_step.random_batch(1, tokens, cfg.vocab_size)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  stats = jax.devices()[0].memory_stats() or {}
  flops = common.train_flops_per_token(cfg, weight_grads=not cfg.lora_rank) * tokens
  gib = lambda x: None if x is None else float(x) / 2**30
  return {
    "state_gib": gib(lm_step.sharded_bytes(shapes, shardings)),
    "predicted_temp_gib": gib(mem.temp_size_in_bytes),
    "predicted_argument_gib": gib(mem.argument_size_in_bytes),
    "peak_in_use_gib": gib(stats.get("peak_bytes_in_use")),
    "device_limit_gib": gib(stats.get("bytes_limit")),
    "compile_s": compile_s,
    "s_per_step": seconds,
    "tokens_per_s": tokens / seconds,
    "mfu_percent": 100 * flops / seconds / (peak_tflops * 1e12),
    "loss": float(metrics["loss"]),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=",".join(c for c in CASES if c != "tiny"))
  p.add_argument("--steps", type=int, default=3, help="timed steps a case, after one warm-up")
  p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's bf16 peak")
  p.add_argument("--out", default="", help="write the rows there (the device's $OUT), not results/")
  args = p.parse_args()
  rows = []
  for name in args.cases.split(","):
    if name not in CASES:
      sys.exit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    try:
      row = {"case": name, **check(*CASES[name], args.steps, args.peak_tflops)}
    except Exception as e:  # noqa: BLE001  one case out of memory must not lose the others
      row = {"case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows.append(row)
    print(json.dumps(row), flush=True)
  cols = ["case", "state_gib", "predicted_temp_gib", "peak_in_use_gib", "s_per_step", "mfu_percent"]
  print(common.table(rows, cols))
  payload = {"rows": rows, "peak_tflops": args.peak_tflops}
  print(f"-> {common.save('device_check', payload, args.out or common.RESULTS)}")


if __name__ == "__main__":
  main()
