"""The check a lent GPU (or TPU) is for: the language-model step's memory as the device's own
compiler predicts it (XLA's memory analysis, the number docs/scaling.md sizes the paper's run
with on CPU) against what the device really allocates when the step runs, and its speed.

  python benchmarks/device_check.py --out=DIR                 # on the device: the prepared set
  python benchmarks/device_check.py --compile_only=1          # the compiler's analysis alone
  python benchmarks/device_check.py --cases=tiny --steps=2    # anywhere (the test's smoke run)

Each case compiles the update of benchmarks/lm_step.py on one device (the scanned model, remat
"full", chunked attention and log-probs, bfloat16 compute, one sequence a step), prints the
compiled analysis (state, temporaries, predicted peak), then builds a random state and runs
warm-up plus --steps timed steps: the device's peak bytes in use (memory_stats; CPU backends
have none), seconds a step, tokens/s and the model FLOP utilisation against --peak_tflops.
Cases: SmolLM2-135M at 2,048 and 8,192 tokens, and with "dot_product" attention
(jax.nn.dot_product_attention, the implementation left to JAX: XLA's) and "cudnn" (its cuDNN
kernel; on a CPU this case's row is its error); four Qwen2.5-32B-width blocks at
22,000 tokens (bfloat16 parameters, whole and LoRA rank 16); the whole 64-block model at 22,000
tokens with LoRA rank 16 (docs/scaling.md's one-device goal). Each case runs in a process of
its own, so the device's peak is that case's alone and one case that runs out of memory (or
--case_timeout) loses no other.
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
  "smollm2-8192-cudnn": (dataclasses.replace(SMOL, attention="cudnn"), 8192),
  "qwen32b-width-4-blocks-22000": (QWEN4, 22_000),
  "qwen32b-width-4-blocks-22000-lora16": (dataclasses.replace(QWEN4, lora_rank=16), 22_000),
  "qwen32b-22000-lora16": (dataclasses.replace(QWEN4, n_layers=64, lora_rank=16), 22_000),
  "tiny": (LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=65, **LONG), 64),
}


def _gib(x):
  return None if x is None else float(x) / 2**30


def compile_case(cfg: LMConfig, tokens: int):
  """(the compiled step, its row: state bytes, the compiler's memory analysis, compile time)."""
  step, shapes, shardings, opt = lm_step.jitted_step(cfg, make_mesh(1))
  t0 = time.perf_counter()
  compiled = step.lower(shapes, lm_step.batch_shapes(1, tokens)).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return (compiled, opt, shardings), {
    "state_gib": _gib(lm_step.sharded_bytes(shapes, shardings)),
    "predicted_temp_gib": _gib(mem.temp_size_in_bytes),
    "predicted_argument_gib": _gib(mem.argument_size_in_bytes),
    "predicted_peak_gib": _gib(peak + mem.temp_size_in_bytes),
    "compile_s": time.perf_counter() - t0,
  }


def run_case_here(cfg: LMConfig, tokens: int, steps: int, peak_tflops: float, compiled) -> dict:
  """Runs the compiled step on a random state: the device's peak bytes, seconds a step."""
  compiled, opt, shardings = compiled
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
  return {
    "peak_in_use_gib": _gib(stats.get("peak_bytes_in_use")),
    "device_limit_gib": _gib(stats.get("bytes_limit")),
    "s_per_step": seconds,
    "tokens_per_s": tokens / seconds,
    "mfu_percent": 100 * flops / seconds / (peak_tflops * 1e12),
    "loss": float(metrics["loss"]),
  }


def one_case(name: str, steps: int, peak_tflops: float, compile_only: bool) -> None:
  """Prints the case's compiled row (so a run cut short keeps it), then the whole row."""
  cfg, tokens = CASES[name]
  cfg = dataclasses.replace(cfg, max_len=tokens + 1)
  compiled, row = compile_case(cfg, tokens)
  row = {"case": name, **row}
  print(json.dumps(row), flush=True)
  if not compile_only:
    print(json.dumps({**row, **run_case_here(cfg, tokens, steps, peak_tflops, compiled)}))


def run_case(name: str, args) -> dict:
  """One case in a process of its own: its row, with the error that ended it if one did."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--one={name}", f"--steps={args.steps}"]
  cmd += [f"--peak_tflops={args.peak_tflops}", f"--compile_only={args.compile_only}"]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout or None)
    out, err, code = r.stdout, r.stderr, r.returncode
  except subprocess.TimeoutExpired as e:
    out, err, code = e.stdout or b"", f"timed out after {args.case_timeout} s", "timeout"
    out = out.decode() if isinstance(out, bytes) else out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  row = rows[-1] if rows else {"case": name}
  if code != 0:
    tail = (str(err).strip().splitlines() or ["no output"])[-1]
    row["error"] = f"exit {code}: {tail[:300]}"
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=",".join(c for c in CASES if c != "tiny"))
  p.add_argument("--steps", type=int, default=3, help="timed steps a case, after one warm-up")
  p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's bf16 peak")
  p.add_argument("--out", default="", help="write the rows there (the device's $OUT), not results/")
  p.add_argument("--compile_only", type=int, default=0, help="1: the compiler's analysis only")
  p.add_argument("--case_timeout", type=float, default=0, help="seconds a case may take (0: none)")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # the per-case process
  args = p.parse_args()
  if args.one:
    return one_case(args.one, args.steps, args.peak_tflops, bool(args.compile_only))
  names = args.cases.split(",")
  if unknown := [n for n in names if n not in CASES]:
    sys.exit(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
  stem = "device_check-compile_only" if args.compile_only else "device_check"
  rows = []
  for name in names:  # saved after every case: a lease that ends early keeps what ran
    rows.append(run_case(name, args))
    print(json.dumps(rows[-1]), flush=True)
    payload = {"rows": rows, "peak_tflops": args.peak_tflops}
    path = common.save(stem, payload, args.out or common.RESULTS)
  cols = ["case", "state_gib", "predicted_peak_gib", "peak_in_use_gib", "s_per_step", "mfu_percent"]
  print(common.table(rows, cols))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
