"""iwsft: importance-weighted supervised fine-tuning (Qin & Springenberg, 2025) in JAX/Flax.

The public core, re-exported from the modules that hold it:
  objectives  ObjectiveConfig, iw_sft_loss           the losses (core/objectives.py)
  config      StageConfig, make_optimizer             stage settings and the optax optimiser
  state       TrainState, init_state, stack_seeds, …  the training state, one run or S seeds
  step        make_update, make_train_steps           update(state, batch) and its jitted dispatch
              pool_logprobs                           π_ref's log-probs over the pool, once
  packing     markov_logprob                          packed batches (no padding computed)
  sharding    make_mesh, state_sharding, shard_pool   the device mesh and where arrays live
  loop        fit, Hooks                              the host loop both pipelines share
"""

from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.loop import Hooks, fit
from iwsft.core.objectives import ObjectiveConfig, iw_sft_loss
from iwsft.core.packing import markov_logprob
from iwsft.core.sharding import (
  FSDP_MIN_SIZE,
  batch_sharded,
  make_mesh,
  pool_rows,
  put_pool,
  put_replicated,
  replicated,
  shard_pool,
  state_sharding,
)
from iwsft.core.state import (
  TrainState,
  init_state,
  num_seeds,
  prng_key,
  seed_slice,
  stack_seeds,
  unstack_seeds,
)
from iwsft.core.step import (
  make_train_steps,
  make_update,
  pool_logprobs,
  sample_sequences,
  sample_steps,
)

__version__ = "0.2.0"

__all__ = [
  "FSDP_MIN_SIZE",
  "Hooks",
  "ObjectiveConfig",
  "StageConfig",
  "TrainState",
  "batch_sharded",
  "fit",
  "init_state",
  "iw_sft_loss",
  "make_mesh",
  "make_optimizer",
  "make_train_steps",
  "make_update",
  "markov_logprob",
  "num_seeds",
  "pool_logprobs",
  "pool_rows",
  "prng_key",
  "put_pool",
  "put_replicated",
  "replicated",
  "sample_sequences",
  "sample_steps",
  "seed_slice",
  "shard_pool",
  "stack_seeds",
  "state_sharding",
  "unstack_seeds",
]
