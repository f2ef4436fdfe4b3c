"""Run in a subprocess with 8 forced CPU devices: the LM update under data × fsdp × model (tensor
parallelism) against one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/tensor_parallel_script.py
Prints one JSON line: per mesh, the losses and the parameters' max difference from the 1-device
run, and for each block projection the column (or row) ranges its model-axis shards hold.
"""

import dataclasses
import json

import jax
import numpy as np
import optax
from flax import nnx
from lm_records import random_records

import iwsft
from iwsft.core.objectives import ObjectiveConfig
from iwsft.lm.model import (
  LMConfig,
  Transformer,
  make_logprob_fn,
  stack_blocks,
  tensor_parallel_dim,
)

# Qwen2-like: rotary positions, SwiGLU, q/k/v biases, untied output, grouped-query attention
CFG = LMConfig(
  vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_len=16,
  positions="rope", mlp="swiglu", qkv_bias=True, tie_embeddings=False,
)  # fmt: skip


def _spans(x, dim: int) -> list[list[int]]:
  """The distinct [start, stop) ranges of `dim` that x's shards hold."""
  size = x.shape[dim]
  return sorted(
    {(s.index[dim].start or 0, size if s.index[dim].stop is None else s.index[dim].stop)
     for s in x.addressable_shards}
  )  # fmt: skip


def main():
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  # SGD: a parameter's difference from one device is the gradients' (Adam's normalisation would
  # magnify rounding in near-zero gradients into whole steps)
  opt = optax.sgd(0.5, momentum=0.9)
  n = 40
  data = random_records(CFG, n)
  ref = jax.tree.map(lambda x: x * 0.99, params)

  def run(mesh, graphdef=graphdef, params=params):
    rows = []
    objective = ObjectiveConfig("sequence", temperature=1.0, q_decay=0.9)
    update = iwsft.make_update(make_logprob_fn(graphdef), opt, objective)
    ref = jax.tree.map(lambda x: x * 0.99, params)
    out = iwsft.fit(
      update,
      iwsft.init_state(params, opt, 0, ref),
      data,
      np.zeros(n, np.float32),
      iwsft.Sampling(6, 16, steps_per_dispatch=3),
      mesh=mesh,
      name="t",
      hooks=iwsft.Hooks(logs=[rows.append]),
      split=tensor_parallel_dim,
    )
    return out, [r["loss"] for r in rows]

  one, loss_one = run(iwsft.make_mesh(1))
  report = {"devices": jax.device_count(), "loss_one": loss_one}
  for data_ways, fsdp, model in ((2, 2, 2), (1, 4, 2), (4, 1, 2)):
    mesh = iwsft.make_mesh(8, fsdp=fsdp, model=model)
    out, loss = run(mesh)
    diffs = [
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(one.params))
    ]
    block = out.params["blocks"][0]
    report[f"{data_ways}x{fsdp}x{model}"] = {
      "loss": loss,
      "max_param_diff": max(diffs),
      "qkv_columns": _spans(block["qkv"]["kernel"][...], 1),
      "qkv_bias": _spans(block["qkv"]["bias"][...], 0),
      "up_columns": _spans(block["up"]["kernel"][...], 1),
      "proj_rows": _spans(block["proj"]["kernel"][...], 0),
      "down_rows": _spans(block["down"]["kernel"][...], 0),
      "qkv_shard": list(block["qkv"]["kernel"][...].addressable_shards[0].data.shape),
      "embed_shard": list(out.params["embed"]["embedding"][...].addressable_shards[0].data.shape),
      "moment_specs_match": _moments_match(out),
      "born_sharded": _born_sharded(params, opt, ref, mesh),
    }
  report["scanned"] = _scanned(run, one)
  print(json.dumps(report))


def _scanned(run, one) -> dict:
  """The scanned model (blocks stacked) on 2 x 2 x 2: the per-layer one-device run's parameters
  stacked, each model-axis shard of a stacked projection whole heads/units of every layer."""
  graphdef, params = nnx.split(
    Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  )
  out, loss = run(iwsft.make_mesh(8, fsdp=2, model=2), graphdef, params)
  want = stack_blocks(nnx.to_pure_dict(one.params))
  got = nnx.to_pure_dict(out.params)
  blocks = got["blocks"]
  return {
    "loss": loss,
    "max_param_diff": max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ),
    "qkv_columns": _spans(blocks["qkv"]["kernel"], 2),
    "proj_rows": _spans(blocks["proj"]["kernel"], 1),
    "layers": _spans(blocks["qkv"]["kernel"], 0),
  }


def _born_sharded(params, opt, ref, mesh) -> bool:
  """init_state with a mesh: every leaf in state_sharding's sharding, the values init_state's."""
  state = iwsft.init_state(params, opt, 0, ref, mesh=mesh, split=tensor_parallel_dim)
  want = iwsft.state_sharding(state, mesh, split=tensor_parallel_dim)
  same_place = all(
    x.sharding.is_equivalent_to(s, x.ndim)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True)
  )
  plain = iwsft.init_state(params, opt, 0, ref)
  same_values = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True)
  )
  return same_place and same_values


def _moments_match(state) -> bool:
  """Every optimiser-state leaf shaped like a parameter has that parameter's sharding."""
  by_shape = {}
  for x in jax.tree.leaves(state.params):
    by_shape.setdefault(x.shape, set()).add(str(x.sharding.spec))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1 and x.shape in by_shape]
  return bool(moments) and all(str(x.sharding.spec) in by_shape[x.shape] for x in moments)


if __name__ == "__main__":
  main()
