"""LM throughput: training tokens/s and model FLOP utilisation (MFU) for a few model sizes, and
sampling tokens/s with and without the KV cache.

  python benchmarks/lm_throughput.py [--sizes=tiny,small,medium]
  python benchmarks/lm_throughput.py --sizes=small --contexts=512,2048 --batch=4   # long sequences

Training runs the shared update (iwsft.core.step: SFT objective, in-graph batch sampling, several
steps per dispatch) on random token sequences of the model's full context. FLOPs per trained token:
6·N (N = the parameters of the matrix multiplies: attention, MLP and the tied unembedding; the
embedding lookup is free) plus 12·L·T·d for the attention scores and values (forward and backward,
the full T×T square as computed). MFU = achieved FLOP/s / the matmul peak measured in the same run.
Sampling: `iwsft.lm.sampling.generate` (prefill + one token per step from the cache) against
`generate_without_cache` (the whole prefix recomputed every step), same prompts and lengths.
With --contexts, training only, at each context length under each of the long-sequence compute
settings (COMPUTES: the plain path, chunked attention and log-probs, and those with remat): what
the memory they save costs in speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iwsft  # noqa: E402
from benchmarks import common  # noqa: E402
from iwsft.core.config import StageConfig, make_optimizer  # noqa: E402
from iwsft.core.objectives import ObjectiveConfig  # noqa: E402
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, param_count  # noqa: E402
from iwsft.lm.sampling import generate, generate_without_cache  # noqa: E402
from iwsft.lm.tokenizer import BOS  # noqa: E402

SIZES = {  # tiny is the language pipeline's default model
  "tiny": LMConfig(d_model=64, n_layers=3, n_heads=4, d_ff=256, max_len=64),
  "small": LMConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=128),
  "medium": LMConfig(d_model=256, n_layers=6, n_heads=8, d_ff=1024, max_len=128),
  "large": LMConfig(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_len=256),
  # SmolLM2-135M-Instruct's shape (random weights: throughput does not depend on them), at the
  # pretrained experiment's context
  "smollm2": dataclasses.replace(common.ARCHITECTURES["smollm2"], max_len=64),
}


def train_tokens_per_s(cfg: LMConfig, batch: int, steps_per_dispatch: int, repeats: int) -> float:
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  optimizer = make_optimizer(StageConfig(steps=10**9, batch_size=batch, learning_rate=1e-4))
  update = iwsft.make_update(make_logprob_fn(graphdef), optimizer, ObjectiveConfig("none"))
  mesh = iwsft.make_mesh(1)
  state = iwsft.core.sharding.put_replicated(iwsft.init_state(params, optimizer, 0), mesh)
  rng = np.random.default_rng(0)
  n = 4 * batch
  tokens = rng.integers(4, cfg.vocab_size, (n, cfg.max_len)).astype(np.int32)
  tokens[:, 0] = BOS
  pool = iwsft.core.sharding.shard_pool(
    {
      "tokens": tokens,
      "mask": np.ones((n, cfg.max_len), np.float32),
      "weight": np.ones(n, np.float32),
    },
    mesh,
  )
  logits = iwsft.core.sharding.put_replicated(np.zeros(n, np.float32), mesh)
  steps = iwsft.make_train_steps(
    update, mesh, iwsft.Sampling(steps_per_dispatch, batch), steps_per_dispatch
  )
  box = [state]

  def call():
    box[0], metrics = steps(box[0], pool, logits)
    jax.block_until_ready(metrics["loss"])

  return steps_per_dispatch * batch * cfg.max_len / common.median_seconds(call, repeats)


def sampling_tokens_per_s(
  cfg: LMConfig, batch: int, prompt_len: int, repeats: int
) -> dict[str, float]:
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  prompts = (
    np.random.default_rng(1).integers(4, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  )
  prompts[:, 0] = BOS
  prompts = jnp.asarray(prompts)
  max_new = cfg.max_len - prompt_len
  out = {}
  for name, fn in (("with KV cache", generate), ("without cache", generate_without_cache)):
    sec = common.median_seconds(
      lambda: fn(graphdef, params, prompts, jax.random.key(0), max_new, 1.0, 0).block_until_ready(),
      repeats,
    )
    out[name] = batch * max_new / sec
  return out


COMPUTES = {  # lm/model.py's compute settings (chunks of 256)
  "full": {},
  "chunked": {"attention": "chunked", "attention_chunk": 256, "logits_chunk": 256},
  "chunked + remat": {
    "attention": "chunked",
    "attention_chunk": 256,
    "logits_chunk": 256,
    "remat": "full",
  },
}


def long_rows(args, peak: float) -> list[dict]:
  """Training tokens/s and MFU per size, context and compute setting."""
  rows = []
  for name in args.sizes.split(","):
    for t in (int(t) for t in args.contexts.split(",")):
      for compute, settings in COMPUTES.items():
        cfg = dataclasses.replace(SIZES[name], max_len=t, **settings)
        tps = train_tokens_per_s(cfg, args.batch, args.steps_per_dispatch, args.repeats)
        flops = common.train_flops_per_token(cfg)
        rows.append(
          {"model": name, "T": t, "compute": compute, "train tokens/s": tps,
           "MFU %": 100 * tps * flops / peak}
        )  # fmt: skip
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--sizes", default="tiny,small,medium", help=f"comma-separated subset of {','.join(SIZES)}"
  )
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps_per_dispatch", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sample_batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--contexts", default="", help="comma-separated context lengths: long rows")
  args = p.parse_args()
  peak = common.matmul_peak()
  if args.contexts:
    rows = long_rows(args, peak)
    print(f"LM training, batch {args.batch}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(common.table(rows, list(rows[0])))
    payload = {"batch": args.batch, "matmul_peak_flops": peak, "rows": rows}
    print(f"-> {common.save(f'lm_throughput-long-{args.sizes}', payload)}")
    return
  rows = []
  for name in args.sizes.split(","):
    cfg = SIZES[name]
    tps = train_tokens_per_s(cfg, args.batch, args.steps_per_dispatch, args.repeats)
    flops = common.train_flops_per_token(cfg)
    samp = sampling_tokens_per_s(
      cfg, args.sample_batch, args.prompt_len, 1
    )  # the uncached pass is slow
    rows.append(
      {
        "model": name,
        "params": param_count(nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]),
        "d/L/ff/T": f"{cfg.d_model}/{cfg.n_layers}/{cfg.d_ff}/{cfg.max_len}",
        "train tokens/s": tps,
        "GFLOP/s": tps * flops / 1e9,
        "MFU %": 100 * tps * flops / peak,
        "sample tok/s (cache)": samp["with KV cache"],
        "sample tok/s (no cache)": samp["without cache"],
        "cache speed-up": samp["with KV cache"] / samp["without cache"],
      }
    )
  print(
    f"LM training (batch {args.batch} sequences of the full context, SFT update) and sampling "
    f"({args.sample_batch} prompts of {args.prompt_len} tokens); "
    f"matmul peak {peak / 1e9:.1f} GFLOP/s "
    f"on {common.machine()['device']}"
  )
  print(common.table(rows, list(rows[0])))
  name = "lm_throughput" if args.sizes == "tiny,small,medium" else f"lm_throughput-{args.sizes}"
  path = common.save(name, {"batch": args.batch, "matmul_peak_flops": peak, "rows": rows})
  print(f"-> {path}")


if __name__ == "__main__":
  main()
