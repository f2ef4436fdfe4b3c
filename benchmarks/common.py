"""Shared pieces of the benchmark scripts: timing, the machine's matmul peak, result files, and
the pretrained architectures the LM benchmarks size and time.

Timings are wall clock around `jax.block_until_ready`, after a warm-up call that compiles; each
number is the median of `repeats` timed calls, so one slow call (another process, a GC) does not
decide it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from iwsft.io.report import format_table
from iwsft.lm.model import LMConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

ARCHITECTURES = {  # the shapes of the Hugging Face configs (weights are not needed to size or time)
  "qwen2.5-32b": LMConfig(
    vocab_size=152_064,
    d_model=5120,
    n_layers=64,
    n_heads=40,
    n_kv_heads=8,
    d_ff=27_648,
    positions="rope",
    rope_theta=1_000_000.0,
    mlp="swiglu",
    qkv_bias=True,
    tie_embeddings=False,
    norm_eps=1e-5,
  ),
  "smollm2": LMConfig(
    vocab_size=49_152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    positions="rope",
    rope_theta=100_000.0,
    mlp="swiglu",
    norm_eps=1e-5,
  ),
}


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_params(cfg: LMConfig) -> int:
  """Parameters of the matrix multiplies: attention, MLP and the unembedding (the embedding
  lookup is free)."""
  d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
  return cfg.n_layers * (2 * d * d + 2 * d * kv + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: LMConfig, weight_grads: bool = True) -> int:
  """Model FLOPs a trained token costs at context cfg.max_len: 6 · N (forward 2 N, backward 4 N;
  4 · N when only activation gradients flow through frozen weights, as under LoRA) plus
  12 · L · T · d for the attention scores and values, the full T × T square (the usual MFU
  accounting: remat's recomputation is not counted)."""
  n = (6 if weight_grads else 4) * matmul_params(cfg)
  return n + 12 * cfg.n_layers * cfg.max_len * cfg.d_model


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a float32 n×n matmul chain on the default device: the practical peak we compare
  with."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n**0.5
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5
  chain = max(8, min(64, (2048 // n) ** 2))  # small matrices: more of them per call, same work

  @jax.jit
  def f(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  sec = median_seconds(lambda: f(a, b).block_until_ready(), repeats)
  return chain * 2 * n**3 / sec


def machine() -> dict:
  dev = jax.devices()[0]
  return {
    "platform": dev.platform,
    "device": getattr(dev, "device_kind", str(dev)),
    "devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "processor": platform.processor(),
    "jax": jax.__version__,
    "python": platform.python_version(),
  }


def save(name: str, payload: dict, out_dir: str = RESULTS) -> str:
  """Writes benchmarks/results/<name>-<platform>.json and returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}-{jax.devices()[0].platform}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine(), **payload}, f, indent=2)
    f.write("\n")
  return path


def table(rows: list[dict], columns: list[str]) -> str:
  """A Markdown table of rows (floats with 3 significant digits)."""
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  return format_table(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows])
