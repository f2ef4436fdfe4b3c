"""Full fine-tuning against LoRA for SmolLM2-135M's shape (random weights), and iw-SFT's memory
against SFT's: per (way of fine-tuning, objective), the training state's bytes (trained part:
parameters or adapters, Adam's moments, q's and π_ref's copies when the update needs them; the
frozen base LoRA reads in place), training tokens/s and the process's peak host memory.

  .venv/bin/python benchmarks/lm_lora.py            # the table in docs/benchmarks.md

Objectives: SFT; iw-SFT in the authors' LM recipe (q the current model detached, π_ref's
log-probs precomputed: neither copy kept); iw-SFT with a lagged q (q_decay 0.9) and π_ref in the
state (the control recipe's choices), which keeps both copies. Each configuration runs in its own
process (so its peak host memory is its own): one update compiled, then --steps timed steps of
--batch sequences of the context's --tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, lm_step  # noqa: E402
from iwsft import recipes  # noqa: E402
from iwsft.core.objectives import ObjectiveConfig  # noqa: E402
from iwsft.core.state import init_state  # noqa: E402
from iwsft.core.step import make_update, state_parts  # noqa: E402
from iwsft.lm.model import Transformer, make_logprob_fn  # noqa: E402

OBJECTIVES = {
  "sft": (ObjectiveConfig("none", q_decay=0.0), True),
  "iw_sft (LM recipe)": (recipes.LM, True),
  "iw_sft (lagged q, π_ref kept)": (dataclasses.replace(recipes.LM, q_decay=0.9), False),
}
WAYS = {"full": 0, "LoRA r=8": 8, "LoRA r=16": 16}


def run_one(way: str, objective: str, tokens: int, batch: int, steps: int) -> dict:
  """One configuration, in this process."""
  from flax import nnx

  cfg = dataclasses.replace(
    common.ARCHITECTURES["smollm2"], max_len=tokens + 1, lora_rank=WAYS[way]
  )
  obj, precomputed = OBJECTIVES[objective]
  parts = state_parts(obj, False, precomputed)
  opt = lm_step.optimizer()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  if cfg.lora_rank:
    graphdef, trained, frozen = nnx.split(model, nnx.LoRAParam, ...)
    ref = trained if parts["keep_ref"] else None
    state = init_state(trained, opt, 0, ref, **parts, frozen=frozen)
  else:
    graphdef, trained = nnx.split(model)
    frozen = None
    state = init_state(trained, opt, 0, trained, **parts)
  data = lm_step.random_batch(batch, tokens, cfg.vocab_size)
  if not precomputed:
    del data["logp_ref"]
  step = jax.jit(make_update(make_logprob_fn(graphdef), opt, obj), donate_argnums=0)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  state_bytes = nbytes(state.replace(frozen=None))
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  return {
    "way": way,
    "objective": objective,
    "trained state MiB": state_bytes / 2**20,
    "frozen base MiB": nbytes(frozen) / 2**20 if frozen is not None else 0.0,
    "train tokens/s": steps * batch * tokens / seconds,
    "peak host MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=64, help="context (the SmolLM2 experiment's)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # way|objective: a child process
  args = p.parse_args()
  if args.one:
    way, objective = args.one.split("|")
    print(json.dumps(run_one(way, objective, args.tokens, args.batch, args.steps)))
    return
  rows = []
  for way in WAYS:
    for objective in OBJECTIVES:
      flags = [f"--tokens={args.tokens}", f"--batch={args.batch}", f"--steps={args.steps}"]
      out = subprocess.run(
        [sys.executable, __file__, *flags, f"--one={way}|{objective}"],
        capture_output=True, text=True, check=True,
      )  # fmt: skip
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
  print(f"SmolLM2-135M shape, batch {args.batch} x {args.tokens} tokens")
  print(common.table(rows, list(rows[0])))
  config = {"tokens": args.tokens, "batch": args.batch, "steps": args.steps}
  print(f"-> {common.save('lm_lora', {'rows': rows, 'config': config})}")


if __name__ == "__main__":
  main()
