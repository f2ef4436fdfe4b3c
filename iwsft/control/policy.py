"""Gaussian policy for continuous control, in Flax NNX (the authors' defaults).

MLP (3 x 256 ReLU by default) -> mean squashed by tanh into the action box; a state-independent
log-std parameter (or a state-dependent head) clipped to [log_std_min, log_std_max]; a diagonal
Normal. The policy works in a normalised action space [-1, 1]^A and maps to the environment's box
with the stored action centre and half-range. Observation normalisation statistics are part of the
module (not trained), so they are saved and restored with the policy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


class Normaliser(nnx.Variable):
  """Fixed statistics (observation mean/std, action centre/scale): saved, never trained."""


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  hidden: tuple[int, ...] = (256, 256, 256)
  state_dependent_std: bool = False
  log_std_min: float = -5.0
  log_std_max: float = 2.0
  init_log_std: float = 0.0


class GaussianPolicy(nnx.Module):
  """π(a|s) = N(centre + scale · tanh(μ(s)), (scale · σ)²) per action dimension."""

  def __init__(
    self, obs_dim: int, act_dim: int, cfg: PolicyConfig = PolicyConfig(), *, rngs: nnx.Rngs
  ):
    self.cfg = cfg
    widths = (obs_dim, *cfg.hidden)
    self.hidden = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(widths[:-1], widths[1:])])
    self.mean_head = nnx.Linear(widths[-1], act_dim, rngs=rngs)
    if cfg.state_dependent_std:
      self.log_std_head = nnx.Linear(widths[-1], act_dim, rngs=rngs)
    else:
      self.log_std = nnx.Param(jnp.full((act_dim,), cfg.init_log_std, jnp.float32))
    self.obs_mean = Normaliser(jnp.zeros((obs_dim,), jnp.float32))
    self.obs_std = Normaliser(jnp.ones((obs_dim,), jnp.float32))
    self.act_centre = Normaliser(jnp.zeros((act_dim,), jnp.float32))
    self.act_scale = Normaliser(jnp.ones((act_dim,), jnp.float32))

  def set_normalisation(self, obs_mean, obs_std, act_low, act_high) -> None:
    """Stores observation statistics and the action box (arrays [obs_dim], [act_dim])."""
    self.obs_mean[...] = jnp.asarray(obs_mean, jnp.float32)
    self.obs_std[...] = jnp.maximum(jnp.asarray(obs_std, jnp.float32), 1e-3)
    low, high = jnp.asarray(act_low, jnp.float32), jnp.asarray(act_high, jnp.float32)
    self.act_centre[...] = (high + low) / 2
    self.act_scale[...] = (high - low) / 2

  def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """obs [..., obs_dim] -> (mean, log_std) in the normalised action space, each [..., act_dim]."""
    x = (obs - self.obs_mean[...]) / self.obs_std[...]
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    mean = jnp.tanh(self.mean_head(x))
    if self.cfg.state_dependent_std:
      log_std = self.log_std_head(x)
    else:
      log_std = jnp.broadcast_to(self.log_std[...], mean.shape)
    return mean, jnp.clip(log_std, self.cfg.log_std_min, self.cfg.log_std_max)

  def log_prob(self, obs: jax.Array, action: jax.Array) -> jax.Array:
    """log π(a|s) of environment-unit actions: obs [..., O], action [..., A] -> [...].

    Evaluated in the normalised action space; the constant Jacobian −Σ log scale is left out (it
    cancels in every ratio and has no gradient).
    """
    mean, log_std = self(obs)
    a = (action - self.act_centre[...]) / self.act_scale[...]
    z = (a - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi), axis=-1)

  def mode(self, obs: jax.Array) -> jax.Array:
    """Deterministic evaluation action (the mean) in environment units: [..., O] -> [..., A]."""
    mean, _ = self(obs)
    return self.act_centre[...] + self.act_scale[...] * mean


def split_policy(policy: GaussianPolicy):
  """-> (graphdef, params, constants): params are trained, constants (normalisers) are fixed."""
  return nnx.split(policy, nnx.Param, ...)


def make_logprob_fn(graphdef, constants):
  """The control pipeline's `logprob_fn(params, batch) -> [B, T]` for the shared update step.

  batch: "observations" [B, T, O], "actions" [B, T, A].
  """

  def logprob_fn(params, batch):
    policy = nnx.merge(graphdef, params, constants)
    return policy.log_prob(batch["observations"], batch["actions"])

  return logprob_fn


def make_act_fn(graphdef, constants):
  """Jitted deterministic policy `act(params, obs [N, O]) -> actions [N, A]` for evaluation."""

  @jax.jit
  def act(params, obs):
    return nnx.merge(graphdef, params, constants).mode(obs.astype(jnp.float32))

  return act


def load_policy(path: str, obs_dim: int, act_dim: int, cfg: PolicyConfig = PolicyConfig()):
  """A saved policy directory (params/ and constants/, as pipeline.py writes) -> GaussianPolicy."""
  from iwsft.io import checkpoint

  graphdef, params, constants = split_policy(
    GaussianPolicy(obs_dim, act_dim, cfg, rngs=nnx.Rngs(0))
  )
  params = checkpoint.restore_state(f"{path}/params", params)
  constants = checkpoint.restore_state(f"{path}/constants", constants)
  return nnx.merge(graphdef, params, constants)
