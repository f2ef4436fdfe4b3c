"""How the backward pass's memory grows with depth: XLA's temporary bytes for the gradient of one
sequence's log-probs, compiled ahead of time from abstract shapes (nothing runs), for the blocks
as a Python loop or scanned (model.scan_layers), with and without remat.

  .venv/bin/python benchmarks/lm_depth.py                  # the table in docs/scaling.md
  .venv/bin/python benchmarks/lm_depth.py --d_model=256 --tokens=1024 --depths=2,4,8

The model is a small rotary decoder (d_model wide, 4 heads, MLP 2 · d_model) on one device.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save, table  # noqa: E402
from iwsft.lm.model import LMConfig, Transformer, token_logprobs  # noqa: E402

flags.DEFINE_list("depths", ["2", "8", "16"], "numbers of blocks")
flags.DEFINE_integer("d_model", 32, "model width")
flags.DEFINE_integer("tokens", 256, "sequence length")
LAYOUTS = {
  "loop": dict(),
  "loop, remat full": dict(remat="full"),
  "scanned": dict(scan_layers=True),
  "scanned, remat full": dict(scan_layers=True, remat="full"),
}


def temp_bytes(n_layers: int, d: int, t: int, **layout) -> tuple[int, float]:
  """(XLA's temporary bytes, compile seconds) of the log-probs' gradient at n_layers blocks."""
  cfg = LMConfig(
    vocab_size=64, d_model=d, n_layers=n_layers, n_heads=4, d_ff=2 * d, max_len=t + 1,
    positions="rope", **layout,
  )  # fmt: skip
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, t + 1), jnp.int32)
  grad = jax.grad(lambda p, x: token_logprobs(nnx.merge(graphdef, p), x).sum())
  t0 = time.perf_counter()
  mem = jax.jit(grad).lower(params, tokens).compile().memory_analysis()
  return mem.temp_size_in_bytes, time.perf_counter() - t0


def main(argv):
  del argv
  F = flags.FLAGS
  depths = [int(n) for n in F.depths]
  rows = []
  for name, layout in LAYOUTS.items():
    row = {"blocks": name}
    for n in depths:
      b, s = temp_bytes(n, F.d_model, F.tokens, **layout)
      row[f"temp MiB at {n}"], row[f"compile s at {n}"] = b / 2**20, s
    row["growth"] = row[f"temp MiB at {depths[-1]}"] / row[f"temp MiB at {depths[0]}"]
    rows.append(row)
    print(table(rows[-1:], list(row)), flush=True)
  cols = ["blocks", *(f"temp MiB at {n}" for n in depths), "growth"]
  print("\n" + table(rows, cols))
  config = {"depths": depths, "d_model": F.d_model, "tokens": F.tokens}
  print(f"-> {save('lm_depth', {'rows': rows, 'config': config})}")


if __name__ == "__main__":
  app.run(main)
