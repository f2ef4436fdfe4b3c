"""Run as one of two processes (4 forced CPU devices each): a model whose parameters are split
over an 8-device mesh spanning both processes, exported as a Hugging Face directory in several
files, each process writing its own files.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/helpers/export_script.py \\
      DIR PORT PROCESS_ID SCAN
Prints one JSON line: this process's index and the files it wrote. Gathering a parameter into
every process (distributed.to_host of it) raises, so the export cannot fall back on it.
"""

import dataclasses
import json
import os
import sys

import jax
from flax import nnx

from iwsft.core.sharding import make_mesh, state_sharding
from iwsft.io import distributed
from iwsft.lm import checkpoints
from iwsft.lm.model import LMConfig, Transformer, tensor_parallel_dim

CFG = LMConfig(  # Qwen2-like; every block matrix large enough to be split over the mesh
  vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256, max_len=16,
  positions="rope", mlp="swiglu", qkv_bias=True, tie_embeddings=False,
)  # fmt: skip


def main(work: str, port: str, process_id: str, scan: str):
  distributed.initialize(f"localhost:{port}", 2, int(process_id))
  cfg = dataclasses.replace(CFG, scan_layers=scan == "1")
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  pure = nnx.to_pure_dict(params)
  mesh = make_mesh(8, fsdp=4, model=2)
  shardings = state_sharding(pure, mesh, split=tensor_parallel_dim, min_size=2**10)
  place = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i])
  nnx.replace_by_pure_dict(params, jax.tree.map(place, pure, shardings))
  assert not all(x.is_fully_addressable for x in jax.tree.leaves(params))

  to_host = distributed.to_host

  def local_only(x):  # to_host gathers an array split over processes into every process
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise AssertionError("a parameter was gathered into every process")
    return to_host(x)

  distributed.to_host = local_only
  written = []
  real = checkpoints._write_safetensors
  checkpoints._write_safetensors = lambda path, t: (
    written.append(os.path.basename(path)),
    real(path, t),
  )
  checkpoints.save_hf(work, cfg, params, dtype="float32", shard_bytes=60_000)
  print(json.dumps({"process": jax.process_index(), "wrote": written}))


if __name__ == "__main__":
  main(*sys.argv[1:])
