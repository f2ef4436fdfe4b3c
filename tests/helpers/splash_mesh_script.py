"""Run in a subprocess with 8 forced CPU devices: splash attention (Pallas interpret mode) over a
data × fsdp × model mesh against the plain attention on one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/splash_mesh_script.py
Prints one JSON line: the attention's output and gradient differences and the all-gathers in its
compiled backward pass, and the LM update's losses and parameters against one device's.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_records import random_records

import iwsft
from iwsft.core.objectives import ObjectiveConfig
from iwsft.lm import splash
from iwsft.lm.model import LMConfig, Transformer, _attend, make_logprob_fn, tensor_parallel_dim
from iwsft.lm.splash import splash_attention

SPLITS = []  # how each traced splash call split its inputs (_partition's mesh axes)


def _recording(partition):
  def wrapped(*shape):
    split = partition(*shape)
    SPLITS.append(None if split is None else [split[1], split[2]])
    return split

  return wrapped


splash._partition = _recording(splash._partition)

CFG = LMConfig(
  vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=24,
  positions="rope", mlp="swiglu", qkv_bias=True, tie_embeddings=False,
)  # fmt: skip


def _attention(mesh) -> dict:
  """Packed rows (two segments) of 4 sequences, 4 query and 2 key/value heads, T = 150."""
  b, h, kv, t, d = 4, 4, 2, 150, 8
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (b, n, t, d)) for key, n in zip(ks, (h, kv, kv)))
  w = jax.random.normal(ks[3], (b, h, t, d))
  seg = jnp.asarray(np.repeat([0, 1], [t // 3, t - t // 3])[None].repeat(b, 0))
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None]
  mask = causal[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  plain = lambda q, k, v, s: jnp.sum(w * _attend(q, k, v, mask))
  fused = lambda q, k, v, s: jnp.sum(w * splash_attention(q, k, v, s))
  args = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v, seg)]
  grad = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    value, grads = grad(*args)
    hlo = grad.lower(*args).compile().as_text()
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v, seg)
  # the same kernel shape outside the context (as π_ref's log-probs are computed before training)
  outside = jax.jit(fused)(q, k, v, seg)
  one = lambda q, k, v, s: jnp.sum(w * splash._splash(q, k, v, s))  # no shard_map
  with jax.set_mesh(mesh):
    unpartitioned = jax.jit(jax.grad(one, argnums=(0, 1, 2))).lower(*args).compile().as_text()
  return {
    "value_diff": abs(float(value - want)),
    "grad_diff": max(float(jnp.abs(a - b).max()) for a, b in zip(grads, want_grads)),
    "outside_diff": abs(float(outside - want)),
    "all_gathers": hlo.count("all-gather("),
    "all_gathers_unpartitioned": unpartitioned.count("all-gather("),
  }


def _update(mesh, attention: str) -> tuple:
  """Four iw-SFT updates (SGD) of a Qwen2-like model -> (losses, parameters)."""
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  model = Transformer(dataclasses.replace(CFG, attention=attention), rngs=nnx.Rngs(0))
  graphdef = nnx.split(model)[0]
  opt = optax.sgd(0.5, momentum=0.9)
  n = 32
  data = random_records(CFG, n)
  rows = []
  update = iwsft.make_update(
    make_logprob_fn(graphdef), opt, ObjectiveConfig("sequence", temperature=1.0, q_decay=0.9)
  )
  out = iwsft.fit(
    update,
    iwsft.init_state(params, opt, 0, jax.tree.map(lambda x: x * 0.99, params)),
    data,
    np.zeros(n, np.float32),
    iwsft.Sampling(4, 8, steps_per_dispatch=2),
    mesh=mesh,
    name="t",
    hooks=iwsft.Hooks(logs=[rows.append]),
    split=tensor_parallel_dim,
  )
  return [r["loss"] for r in rows], jax.tree.leaves(out.params)


def main():
  mesh = iwsft.make_mesh(8, fsdp=2, model=2)
  loss_one, params_one = _update(iwsft.make_mesh(1), "full")
  SPLITS.clear()
  loss, params = _update(mesh, "splash")
  splits = list(SPLITS)  # the update's calls only
  report = {
    "devices": jax.device_count(),
    "attention": _attention(mesh),
    "loss_one": loss_one,
    "loss": loss,
    "update_splits": splits,
    "max_param_diff": max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(params, params_one)
    ),
  }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
