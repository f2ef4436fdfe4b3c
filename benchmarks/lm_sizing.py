"""Per-device memory of an iw-SFT update, from XLA's own analysis of the step compiled ahead of
time from abstract shapes: no weights are read and nothing runs.

  .venv/bin/python benchmarks/lm_sizing.py                      # the table of docs/scaling.md
  .venv/bin/python benchmarks/lm_sizing.py --models=smollm2 --tokens=2048,8192

The step is the language pipeline's (iwsft.make_update with the authors' LM recipe, π_ref's
log-probs precomputed, AdamW with clipping, the lean state: no q or π_ref copies), training the
whole model or (--lora_ranks) LoRA adapters on the frozen base, on `--devices` forced host
devices as one FSDP axis (every large leaf split over all of them) or, with --tensor_parallel=M,
as FSDP over devices / M times a model axis of M (each block's heads and MLP units split M ways,
Megatron-style), a global batch of one sequence per device (a model group's devices share their
sequences: --micro_batches=M keeps one sequence's activations at a time per device), in bfloat16
compute with float32 parameters (--param_dtype=bfloat16: bfloat16 parameters, and Adam's
moments with them), with chunked attention, rematerialised blocks and chunked log-probs
(lm/model.py's compute settings). The blocks are scanned (model.scan_layers), so the whole model
is compiled at its depth; with --noscan_layers they are a Python loop, which compiles slowly at
64 blocks on 2 cores, so Qwen2.5-32B's step is then compiled at --blocks=A,B blocks of the full
width and the temporaries extrapolated linearly to the model's depth (the table says which).
Parameters, q, π_ref and the optimiser state are computed exactly from their sharded shapes, and
whether that state alone fits a GPU is the table's firm statement. The temporaries are what XLA's
CPU backend assigns: it widens bfloat16 operations to float32 and its schedule does not lower
them under remat (a `jax.checkpoint` of a plain MLP stack measures the same there), so they are
not a GPU's number; a GPU's own allocation is the check that settles it.
"""

import os
import sys

if "jax" not in sys.modules:  # forced host devices must be set before jax starts
  devices = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  flag = f"--xla_force_host_platform_device_count={devices}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import lm_step  # noqa: E402
from benchmarks.common import ARCHITECTURES, save, table, train_flops_per_token  # noqa: E402
from iwsft.core.sharding import make_mesh  # noqa: E402
from iwsft.lm.model import (  # noqa: E402
  LMConfig,
  Transformer,
  check_tensor_parallel,
)

GIB = 2**30
S1K_STEPS, S1K_BATCH = 625, 8  # the authors' 5 epochs of s1K-1.1's 1,000 traces, 8 a step
GPU_BF16_FLOPS = 989e12  # an H100's (and H200's) dense bfloat16 peak
MFU = 0.4
COMPUTE = dict(
  dtype="bfloat16", attention="chunked", attention_chunk=1024, remat="full", logits_chunk=1024
)
MODELS = ARCHITECTURES
GPUS = {"H100 80 GB": 80, "H200 141 GB": 141}

flags.DEFINE_list("models", list(MODELS), "models to size")
flags.DEFINE_list("tokens", ["22000"], "sequence lengths (one sequence per device)")
flags.DEFINE_integer("devices", 8, "forced host devices")
flags.DEFINE_integer("tensor_parallel", 1, "the model axis (FSDP over the remaining devices)")
flags.DEFINE_enum(
  "moment_dtype", "", ["", "float32", "bfloat16"], "Adam's moments' type ('': the parameters')"
)
flags.DEFINE_integer(
  "micro_batches", 1, "the batch's gradient accumulated over this many parts (make_update)"
)
flags.DEFINE_bool(
  "scan_layers", True, "blocks scanned (compiled whole); --noscan_layers: a Python loop of blocks"
)
flags.DEFINE_list(
  "blocks",
  ["1", "2"],
  "unscanned Qwen2.5-32B: compile at these depths and extrapolate (empty: whole)",
)
flags.DEFINE_enum(
  "param_dtype", "float32", ["float32", "bfloat16"], "the parameters' type (Adam's moments follow)"
)
flags.DEFINE_bool(
  "flops_only", False, "print the FLOPs and time table (analytic, nothing compiled) and stop"
)
flags.DEFINE_list(
  "lora_ranks",
  ["0", "16"],
  "0: the whole model trained; R: LoRA adapters of rank R on all four"
  " projections of every block, the base frozen",
)


def compiled_memory(
  cfg: LMConfig, tokens: int, mesh, micro_batches: int = 1, moment_dtype: str = ""
) -> dict:
  """XLA's memory analysis of the update at `tokens` tokens per sequence, per device."""
  step, state, shardings, _ = lm_step.jitted_step(cfg, mesh, micro_batches, moment_dtype)
  t0 = time.perf_counter()
  batch = lm_step.batch_shapes(mesh.devices.size, tokens)
  mem = step.lower(state, batch).compile().memory_analysis()
  return {
    "state_bytes": lm_step.sharded_bytes(state, shardings),
    "temp_bytes": float(mem.temp_size_in_bytes),
    "argument_bytes": float(mem.argument_size_in_bytes),
    "compile_s": time.perf_counter() - t0,
  }


def size(
  name: str,
  tokens: int,
  mesh,
  blocks: list[int],
  lora_rank: int = 0,
  param_dtype="float32",
  micro_batches: int = 1,
  moment_dtype: str = "",
  scan_layers: bool = True,
) -> dict:
  """One row: per-device state and temporaries (extrapolated in depth when `blocks`)."""
  cfg = dataclasses.replace(
    MODELS[name],
    max_len=tokens + 1,
    lora_rank=lora_rank,
    param_dtype=param_dtype,
    scan_layers=scan_layers,
    **COMPUTE,
  )
  if blocks:  # affine in depth: temp(n) = a + n · per_block, measured at two depths
    lo, hi = (
      compiled_memory(
        dataclasses.replace(cfg, n_layers=n), tokens, mesh, micro_batches, moment_dtype
      )
      for n in blocks
    )
    per_block = {k: (hi[k] - lo[k]) / (blocks[1] - blocks[0]) for k in lo}
    at_depth = {k: lo[k] + (cfg.n_layers - blocks[0]) * per_block[k] for k in lo}
    compile_s = lo["compile_s"] + hi["compile_s"]
    how = f"compiled at {blocks[0]} and {blocks[1]} blocks, linear in depth"
  else:
    at_depth = compiled_memory(cfg, tokens, mesh, micro_batches, moment_dtype)
    per_block, compile_s = {"temp_bytes": float("nan")}, at_depth["compile_s"]
    how = "whole, scanned" if scan_layers else "whole"
  shapes = jax.tree.leaves(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  state = at_depth["state_bytes"]
  row = {
    "model": name,
    "lora_rank": lora_rank,
    "param_dtype": param_dtype,
    "moment_dtype": moment_dtype or param_dtype,
    "tokens": tokens,
    "devices": mesh.devices.size,
    "tensor_parallel": mesh.shape["model"],
    "micro_batches": micro_batches,
    "scan_layers": scan_layers,
    "params_b": float(sum(np.prod(x.shape) for x in shapes)) / 1e9,
    "state_gib": state / GIB,
    "temp_gib": at_depth["temp_bytes"] / GIB,
    "temp_gib_per_block": per_block["temp_bytes"] / GIB,
    "how": how,
    "compile_s": compile_s,
  }
  for gpu, gb in GPUS.items():  # usable: 93% of the nominal GB
    row[f"state fits {gpu}"] = "yes" if state <= 0.93 * gb * 1e9 else "no"
  return row


def flops_row(name: str, tokens: int, lora_rank: int, gpus: int = 8) -> dict:
  """Model FLOPs of one step of S1K_BATCH sequences of `tokens` tokens (every trace at that
  length: an upper bound for traces up to it), and the hours of the authors' S1K_STEPS steps on
  `gpus` GPUs at MFU of their bfloat16 peak."""
  cfg = dataclasses.replace(MODELS[name], max_len=tokens)
  step = train_flops_per_token(cfg, weight_grads=not lora_rank) * tokens * S1K_BATCH
  hours = S1K_STEPS * step / (gpus * GPU_BF16_FLOPS * MFU) / 3600
  return {
    "model": name,
    "lora_rank": lora_rank,
    "tokens": tokens,
    "PFLOP per step": step / 1e15,
    "GPUs": gpus,
    f"hours for {S1K_STEPS} steps at {MFU:.0%} MFU": hours,
  }


def main(argv):
  del argv
  F = flags.FLAGS
  if F.flops_only:
    rows = [
      flops_row(name, int(t), int(r), gpus)
      for name in F.models
      for t in F.tokens
      for r in F.lora_ranks
      for gpus in (8, 1)
    ]
    print(table(rows, list(rows[0])))
    print(f"-> {save('lm_flops', {'rows': rows})}")
    return
  tp = F.tensor_parallel
  mesh = make_mesh(F.devices, fsdp=F.devices // tp, model=tp)
  blocks = [int(b) for b in F.blocks]
  rows = []
  for name in F.models:
    for t in (int(t) for t in F.tokens):
      for r in (int(r) for r in F.lora_ranks):
        depth = blocks if name == "qwen2.5-32b" and not F.scan_layers else []
        check_tensor_parallel(MODELS[name], mesh)
        args = (F.param_dtype, F.micro_batches, F.moment_dtype, F.scan_layers)
        rows.append(size(name, t, mesh, depth, r, *args))
        print(table(rows[-1:], list(rows[-1])), flush=True)
  cols = [
    "model",
    "lora_rank",
    "tokens",
    "devices",
    "tensor_parallel",
    "micro_batches",
    "params_b",
    "state_gib",
    *(f"state fits {g}" for g in GPUS),
  ]
  cols += ["temp_gib", "temp_gib_per_block", "how", "compile_s"]
  print("\n" + table(rows, cols))
  name = "lm_sizing" if tp == 1 else f"lm_sizing-tp{tp}-mb{F.micro_batches}"
  if F.devices != 8:
    name += f"-devices{F.devices}"
  if F.param_dtype != "float32":
    name += f"-params-{F.param_dtype}"
  if not F.scan_layers:
    name += "-loop"
  if F.moment_dtype:
    name += f"-moments-{F.moment_dtype}"
  print(f"-> {save(name, {'rows': rows, 'compute': COMPUTE})}")


if __name__ == "__main__":
  app.run(main)
