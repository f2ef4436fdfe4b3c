"""Run in a subprocess with 8 forced CPU devices: the LM update under FSDP against one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/fsdp_script.py
Prints one JSON line: per mesh, the losses and parameters' max difference from the 1-device run, and
the shard shapes of the largest weight matrix and of its Adam moment.
"""

import json

import jax
import numpy as np
from flax import nnx
from lm_records import random_records

import iwsft
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.objectives import ObjectiveConfig
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn


def main():
  cfg = LMConfig(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=16)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  opt = make_optimizer(StageConfig(steps=100, batch_size=16, learning_rate=1e-3))
  update = iwsft.make_update(
    make_logprob_fn(graphdef), opt, ObjectiveConfig("sequence", temperature=1.0, q_decay=0.9)
  )
  n = 40
  data = random_records(cfg, n)
  logits = np.zeros(n, np.float32)
  ref = jax.tree.map(lambda x: x * 0.99, params)

  def run(mesh):
    rows = []
    state = iwsft.init_state(params, opt, 0, ref)
    out = iwsft.fit(
      update,
      state,
      data,
      logits,
      iwsft.Sampling(6, 16, steps_per_dispatch=3),
      mesh=mesh,
      name="t",
      hooks=iwsft.Hooks(logs=[rows.append]),
    )
    return out, [r["loss"] for r in rows]

  one, loss_one = run(iwsft.make_mesh(1))
  report = {"devices": jax.device_count()}
  for fsdp in (4, 8):
    mesh = iwsft.make_mesh(8, fsdp=fsdp)
    out, loss = run(mesh)
    diffs = [
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(one.params))
    ]
    leaves = jax.tree.leaves(out.params)
    big = max(range(len(leaves)), key=lambda i: leaves[i].size)
    w = leaves[big]
    mu = [x for x in jax.tree.leaves(out.opt_state) if x.shape == w.shape][0]
    report[f"fsdp{fsdp}"] = {
      "loss": loss,
      "loss_one": loss_one,
      "max_param_diff": max(diffs),
      "big_shape": list(w.shape),
      "big_shard_shapes": sorted({tuple(s.data.shape) for s in w.addressable_shards}),
      "big_devices": len({s.device for s in w.addressable_shards}),
      "big_distinct_slices": len({str(s.index) for s in w.addressable_shards}),
      "moment_shard_shapes": sorted({tuple(s.data.shape) for s in mu.addressable_shards}),
      "small_replicated": all(
        x.sharding.is_fully_replicated for x in leaves if x.size < iwsft.core.sharding.FSDP_MIN_SIZE
      ),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
