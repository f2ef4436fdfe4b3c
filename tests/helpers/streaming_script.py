"""Run in a subprocess with 8 forced CPU devices: a sharded bfloat16 Hugging Face checkpoint read
onto an 8-way FSDP mesh tensor by tensor.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/streaming_script.py DIR
Prints one JSON line: leaves, how many are split over the devices, whether every leaf has FSDP's
sharding, the largest difference from the checkpoint's values (rounded to bfloat16, numpy), and
the largest leaf's global and per-device shapes.
"""

import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_files import reshard  # noqa: E402

from iwsft.core.sharding import make_mesh, state_sharding  # noqa: E402
from iwsft.core.state import init_state  # noqa: E402
from iwsft.lm import checkpoints  # noqa: E402
from iwsft.lm.model import LMConfig, Transformer, stack_blocks, tensor_parallel_dim  # noqa: E402


def main(work: str):
  cfg = LMConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_len=32,
    positions="rope", mlp="swiglu", qkv_bias=True, tie_embeddings=False, norm_eps=1e-5,
  )  # fmt: skip
  _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  shutil.rmtree(work, ignore_errors=True)
  checkpoints.save_hf(work, cfg, params)
  reshard(work, "bfloat16")
  mesh = make_mesh(8, fsdp=8)
  _, _, placed = checkpoints.load_hf(work, max_len=32, mesh=mesh)
  want = jax.tree.map(
    lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
    nnx.to_pure_dict(params),
  )
  got = nnx.to_pure_dict(placed)
  rules = jax.tree.leaves(state_sharding(got, mesh))
  leaves = jax.tree.leaves(got)
  biggest = max(leaves, key=lambda x: x.size)
  # the training state made from the placed parameters: its copies and Adam's moments inherit
  # their shardings, so no full copy is ever made on one device
  state = init_state(placed, optax.adamw(1e-3), 0, keep_ref=False)
  large = [x for x in jax.tree.leaves(state) if x.size >= 2**14]
  state_rules = jax.tree.leaves(state_sharding(state, mesh))
  big = [
    (x, r) for x, r in zip(jax.tree.leaves(state), state_rules, strict=True) if x.size >= 2**14
  ]
  print(
    json.dumps(
      {
        "leaves": len(leaves),
        "split": sum(len(x.sharding.device_set) == 8 and not x.is_fully_replicated for x in leaves),
        "fsdp_shardings": all(x.sharding == r for x, r in zip(leaves, rules, strict=True)),
        "max_diff": max(
          float(np.abs(np.asarray(a) - b).max())
          for a, b in zip(leaves, jax.tree.leaves(want), strict=True)
        ),
        "shape": list(biggest.shape),
        "shard": list(biggest.addressable_shards[0].data.shape),
        "state_large_leaves": len(large),
        "state_fsdp": all(x.sharding == r for x, r in big),
        **_scanned(work, want),
      }
    )
  )


def _scanned(work: str, want: dict) -> dict:
  """The checkpoint loaded scanned onto (data, fsdp, model) = (2, 2, 2): stacked leaves filled a
  layer at a time into their shardings; exported from there and read back per layer."""
  mesh = make_mesh(8, fsdp=2, model=2)
  cfg, _, placed = checkpoints.load_hf(work, max_len=32, mesh=mesh, scan_layers=True)
  got = nnx.to_pure_dict(placed)
  rules = jax.tree.leaves(state_sharding(got, mesh, split=tensor_parallel_dim))
  checkpoints.save_hf(work + "-export", cfg, placed)
  _, _, back = checkpoints.load_hf(work + "-export", max_len=32)
  diff = lambda xs, ys: max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True)
  )
  return {
    "scanned_shardings": all(
      x.sharding.is_equivalent_to(r, x.ndim)
      for x, r in zip(jax.tree.leaves(got), rules, strict=True)
    ),
    "scanned_split": sum(not x.is_fully_replicated for x in jax.tree.leaves(got)),
    "scanned_diff": diff(got, stack_blocks(want)),
    "scanned_export_diff": diff(nnx.to_pure_dict(back), want),
  }


if __name__ == "__main__":
  main(sys.argv[1])
