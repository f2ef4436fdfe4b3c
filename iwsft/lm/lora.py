"""LoRA fine-tuning (Hu et al., 2021) with flax NNX's `nnx.LoRA` beside a block's projections.

The adapters are the only trained parameters; the base model is the update's frozen part
(TrainState.frozen), so the optimiser's moments, q's EMA and π_ref's copy are adapter-sized.
Adapter B starts at zero, so at the start the model is exactly the base model: π_ref (the model
fine-tuning starts from) is the adapters' initial value, with no copy of the base. The trained
model is the base with each adapter merged into its projection, W + (alpha / rank) · A B, saved
and exported in the base model's own layout.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from iwsft.lm.model import LMConfig, Transformer


def with_lora(mcfg: LMConfig, rank: int, alpha: float, targets) -> LMConfig:
  return dataclasses.replace(mcfg, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))


def adapters(mcfg: LMConfig, seed: int):
  """(graphdef of the model with adapters, its adapters' initial state). Only the adapters are
  made: the base model's initialisation is traced, never computed (jit drops it)."""
  make = lambda: Transformer(mcfg, rngs=nnx.Rngs(seed))
  graphdef = nnx.split(nnx.eval_shape(make), nnx.LoRAParam, ...)[0]
  return graphdef, jax.jit(lambda: nnx.state(make(), nnx.LoRAParam))()


def merge(graphdef, lora, base):
  """The base parameters with every adapter merged into its projection: kernel + (alpha / rank)
  · A B [in, out] (per layer, for a scanned model's stacked leaves); the base model's own state
  layout (no adapter leaves)."""
  model = nnx.merge(graphdef, lora, base, copy=True)  # base itself stays as it was
  cfg = model.cfg
  blocks = [model.blocks] if cfg.scan_layers else model.blocks  # stacked: [L, ...] leaves
  for block in blocks:
    for name in cfg.lora_targets:
      dense, adapter = getattr(block, name), getattr(block, f"{name}_lora")
      delta = adapter.lora_a[...] @ adapter.lora_b[...]
      kernel = dense.kernel[...]
      merged = kernel + (cfg.lora_alpha / cfg.lora_rank) * delta
      dense.kernel.value = merged.astype(kernel.dtype)
  return nnx.split(model, nnx.LoRAParam, ...)[2]
