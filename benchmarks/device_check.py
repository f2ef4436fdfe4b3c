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
import subprocess
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
  "qwen32b-22000-lora16": (dataclasses.replace(QWEN4, n_layers=64, lora_rank=16), 22_000),
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
    "predicted_peak_gib": gib(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    ),  # fmt: skip
    "peak_in_use_gib": gib(stats.get("peak_bytes_in_use")),
    "device_limit_gib": gib(stats.get("bytes_limit")),
    "compile_s": compile_s,
    "s_per_step": seconds,
    "tokens_per_s": tokens / seconds,
    "mfu_percent": 100 * flops / seconds / (peak_tflops * 1e12),
    "loss": float(metrics["loss"]),
  }


def run_case(name: str, steps: int, peak_tflops: float) -> dict:
  """One case in a process of its own: its row, or the error that ended it."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--one={name}", f"--steps={steps}"]
  r = subprocess.run([*cmd, f"--peak_tflops={peak_tflops}"], capture_output=True, text=True)
  rows = [line for line in r.stdout.splitlines() if line.startswith("{")]
  if r.returncode == 0 and rows:
    return json.loads(rows[-1])
  tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
  return {"case": name, "error": f"exit {r.returncode}: {tail[:300]}"}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=",".join(c for c in CASES if c != "tiny"))
  p.add_argument("--steps", type=int, default=3, help="timed steps a case, after one warm-up")
  p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's bf16 peak")
  p.add_argument("--out", default="", help="write the rows there (the device's $OUT), not results/")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # the per-case process
  args = p.parse_args()
  if args.one:
    print(json.dumps({"case": args.one, **check(*CASES[args.one], args.steps, args.peak_tflops)}))
    return
  names = args.cases.split(",")
  if unknown := [n for n in names if n not in CASES]:
    sys.exit(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
  rows = []
  for name in names:  # saved after every case: a lease that ends early keeps what ran
    rows.append(run_case(name, args.steps, args.peak_tflops))
    print(json.dumps(rows[-1]), flush=True)
    path = common.save(
      "device_check", {"rows": rows, "peak_tflops": args.peak_tflops}, args.out or common.RESULTS
    )
  cols = ["case", "state_gib", "predicted_peak_gib", "peak_in_use_gib", "s_per_step", "mfu_percent"]
  print(common.table(rows, cols))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
