"""iwsft: importance-weighted supervised fine-tuning (Qin & Springenberg, 2025) in JAX/Flax.

The public core, for use inside any training loop (needs only `pip install iwsft`):

  the loss      ObjectiveConfig, iw_sft_loss, recipes     (core/objectives.py, recipes.py)
  its parts     sequence_weights, step_weights, effective_sample_size, bound_estimates,
                sequence_logprob, token_logprobs, update_q (q ← EMA of θ)
  training      TrainState, init_state, make_update, StageConfig, make_optimizer   (core/state.py,
                core/step.py, core/config.py): `update(state, batch) -> (state, metrics)`
  the host loop fit, Hooks, Sampling, make_train_steps, pool_logprobs, stack_seeds, unstack_seeds
  devices       make_mesh, state_sharding                 (core/sharding.py)

The pipelines are subpackages with their own extras: iwsft.control (`pip install 'iwsft[control]'`),
iwsft.datasets (the same extra) and iwsft.lm (`pip install 'iwsft[lm]'`).
"""

from iwsft import recipes
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.loop import Hooks, fit
from iwsft.core.objectives import (
  ObjectiveConfig,
  bound_estimates,
  effective_sample_size,
  iw_sft_loss,
  sequence_logprob,
  sequence_weights,
  step_weights,
  token_logprobs,
)
from iwsft.core.sharding import make_mesh, state_sharding
from iwsft.core.state import TrainState, init_state, stack_seeds, unstack_seeds, update_q
from iwsft.core.step import Sampling, make_train_steps, make_update, pool_logprobs

__version__ = "0.8.0"

__all__ = [
  "Hooks",
  "ObjectiveConfig",
  "Sampling",
  "StageConfig",
  "TrainState",
  "bound_estimates",
  "effective_sample_size",
  "fit",
  "init_state",
  "iw_sft_loss",
  "make_mesh",
  "make_optimizer",
  "make_train_steps",
  "make_update",
  "pool_logprobs",
  "recipes",
  "sequence_logprob",
  "sequence_weights",
  "stack_seeds",
  "state_sharding",
  "step_weights",
  "token_logprobs",
  "unstack_seeds",
  "update_q",
]
