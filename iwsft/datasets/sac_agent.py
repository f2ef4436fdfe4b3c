"""The soft actor-critic agent (Haarnoja et al., 2018): networks, its pure update, and the actor
as a numpy behaviour for recording. Training it on an environment is sac.py."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iwsft.errors import UserError


@dataclasses.dataclass(frozen=True)
class SACConfig:
  total_steps: int = 100_000
  start_steps: int = 5_000  # uniform random actions before the actor acts
  hidden: tuple[int, ...] = (256, 256)
  batch_size: int = 256
  learning_rate: float = 3e-4
  gamma: float = 0.99
  tau: float = 0.005
  chunk: int = 50  # environment steps between dispatches of as many updates
  snapshot_every: int = 5_000
  eval_episodes: int = 5
  seed: int = 0
  # Train on past total_steps, snapshot by snapshot, until two snapshots in a row reach
  # target_return; reaching max_steps first is an error (TargetNotReached). None: total_steps only.
  target_return: float | None = None
  max_steps: int = 0

  def __post_init__(self):
    if self.target_return is not None and self.max_steps < self.total_steps:
      raise UserError(f"max_steps ({self.max_steps}) must be >= total_steps ({self.total_steps})")

  @property
  def step_cap(self) -> int:
    return self.total_steps if self.target_return is None else self.max_steps


class TargetNotReached(UserError):
  """SAC did not reach SACConfig.target_return in two evaluations in a row within max_steps."""


def _mlp(sizes, rngs):
  return nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])])


def _forward(layers, x):
  for layer in layers[:-1]:
    x = jax.nn.relu(layer(x))
  return layers[-1](x)


class Actor(nnx.Module):
  """tanh-squashed diagonal Gaussian in [-1, 1]^A (scaled to the action box by the caller)."""

  def __init__(self, obs_dim, act_dim, hidden, rngs):
    self.net = _mlp((obs_dim, *hidden, 2 * act_dim), rngs)

  def dist(self, obs):
    mean, log_std = jnp.split(_forward(self.net, obs), 2, axis=-1)
    return mean, jnp.clip(log_std, -5.0, 2.0)

  def sample(self, key, obs):
    """-> (action in [-1, 1], log-prob of it), with the tanh change of variables."""
    mean, log_std = self.dist(obs)
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    logp = jnp.sum(
      -0.5 * ((u - mean) * jnp.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi), -1
    )
    logp -= jnp.sum(2 * (math.log(2) - u - jax.nn.softplus(-2 * u)), -1)  # log(1 - tanh(u)^2)
    return jnp.tanh(u), logp

  def mode(self, obs):
    return jnp.tanh(self.dist(obs)[0])


class TwinCritic(nnx.Module):
  def __init__(self, obs_dim, act_dim, hidden, rngs):
    self.q1 = _mlp((obs_dim + act_dim, *hidden, 1), rngs)
    self.q2 = _mlp((obs_dim + act_dim, *hidden, 1), rngs)

  def __call__(self, obs, act):
    x = jnp.concatenate([obs, act], -1)
    return _forward(self.q1, x)[..., 0], _forward(self.q2, x)[..., 0]


class SACState(flax.struct.PyTreeNode):
  actor: nnx.State
  critic: nnx.State
  target: nnx.State
  log_alpha: jax.Array
  actor_opt: optax.OptState
  critic_opt: optax.OptState
  alpha_opt: optax.OptState
  key: jax.Array


def _critic_step(critic_def, opt, cfg: SACConfig, state: SACState, batch, target):
  """One Adam step of both critics towards the soft Bellman target [B]."""

  def critic_loss(p):
    q1, q2 = nnx.merge(critic_def, p)(batch["obs"], batch["action"])
    return jnp.mean((q1 - target) ** 2 + (q2 - target) ** 2)

  c_loss, c_grad = jax.value_and_grad(critic_loss)(state.critic)
  c_upd, critic_opt = opt.update(c_grad, state.critic_opt, state.critic)
  return optax.apply_updates(state.critic, c_upd), critic_opt, c_loss


def _actor_step(actor_def, critic_def, opt, state: SACState, batch, critic_p, alpha, key):
  """One Adam step of the actor against the new critics -> (params, opt state, loss, log-probs)."""

  def actor_loss(p):
    a, logp = nnx.merge(actor_def, p).sample(key, batch["obs"])
    q1, q2 = nnx.merge(critic_def, critic_p)(batch["obs"], a)
    return jnp.mean(alpha * logp - jnp.minimum(q1, q2)), logp

  (a_loss, logp), a_grad = jax.value_and_grad(actor_loss, has_aux=True)(state.actor)
  a_upd, actor_opt = opt.update(a_grad, state.actor_opt, state.actor)
  return optax.apply_updates(state.actor, a_upd), actor_opt, a_loss, logp


def _update(actor_def, critic_def, opt, cfg: SACConfig, act_dim: int, state: SACState, batch):
  """One SAC update: critics to the entropy-regularised target, actor, temperature, target
  critics (Polyak)."""
  target_entropy = -float(act_dim)
  key = jax.random.wrap_key_data(state.key)
  key, k_next, k_pi = jax.random.split(key, 3)
  actor, alpha = nnx.merge(actor_def, state.actor), jnp.exp(state.log_alpha)
  next_a, next_logp = actor.sample(k_next, batch["next_obs"])
  tq1, tq2 = nnx.merge(critic_def, state.target)(batch["next_obs"], next_a)
  target = batch["reward"] + cfg.gamma * (1 - batch["terminal"]) * (
    jnp.minimum(tq1, tq2) - alpha * next_logp
  )
  target = jax.lax.stop_gradient(target)
  critic_p, critic_opt, c_loss = _critic_step(critic_def, opt, cfg, state, batch, target)
  actor_p, actor_opt, a_loss, logp = _actor_step(
    actor_def, critic_def, opt, state, batch, critic_p, alpha, k_pi
  )
  entropy_gap = jax.lax.stop_gradient(-logp.mean() - target_entropy)
  al_grad = entropy_gap  # d/d log_alpha of log_alpha · (−log π − target entropy), averaged
  al_upd, alpha_opt = opt.update(al_grad, state.alpha_opt, state.log_alpha)
  log_alpha = optax.apply_updates(state.log_alpha, al_upd)
  target_p = optax.incremental_update(critic_p, state.target, cfg.tau)
  new = SACState(
    actor_p,
    critic_p,
    target_p,
    log_alpha,
    actor_opt,
    critic_opt,
    alpha_opt,
    jax.random.key_data(key),
  )
  return new, {"critic_loss": c_loss, "actor_loss": a_loss, "alpha": alpha}


def make_sac(obs_dim: int, act_dim: int, cfg: SACConfig):
  """-> (init_state, update_many, act) as pure functions of explicit state."""
  actor_def, actor_p = nnx.split(Actor(obs_dim, act_dim, cfg.hidden, nnx.Rngs(cfg.seed)))
  critic_def, critic_p = nnx.split(TwinCritic(obs_dim, act_dim, cfg.hidden, nnx.Rngs(cfg.seed + 1)))
  opt = optax.adam(cfg.learning_rate)

  def init_state():
    log_alpha = jnp.zeros(())
    key = jax.random.key_data(jax.random.key(cfg.seed))
    return SACState(
      actor_p,
      critic_p,
      jax.tree.map(jnp.array, critic_p),
      log_alpha,
      opt.init(actor_p),
      opt.init(critic_p),
      opt.init(log_alpha),
      key,
    )

  update = lambda state, batch: _update(actor_def, critic_def, opt, cfg, act_dim, state, batch)

  @jax.jit
  def update_many(state, batches):
    """batches: leaves [K, B, ...] -> K updates in one dispatch."""
    return jax.lax.scan(update, state, batches)

  @jax.jit
  def act(actor_params, obs, key, deterministic):
    actor = nnx.merge(actor_def, actor_params)
    return jnp.where(deterministic, actor.mode(obs), actor.sample(key, obs)[0])

  return init_state, update_many, act


def numpy_sampler(actor_params: nnx.State) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """The actor as a numpy function for recording data: sample(obs [N, O], noise [N, A]) ->
  tanh(mean + std · noise) [N, A] in [-1, 1], float32 (Actor.sample with its noise given)."""
  net = nnx.to_pure_dict(jax.device_get(actor_params))["net"]
  layers = [(np.asarray(net[i]["kernel"]), np.asarray(net[i]["bias"])) for i in sorted(net)]

  def sample(obs, noise):
    x = np.asarray(obs, np.float32)
    for w, b in layers[:-1]:
      x = np.maximum(x @ w + b, 0.0)
    mean, log_std = np.split(x @ layers[-1][0] + layers[-1][1], 2, axis=-1)
    return np.tanh(mean + np.exp(np.clip(log_std, -5.0, 2.0)) * noise)

  return sample


def numpy_behaviour(actor_params: nnx.State, space: gym.spaces.Box):
  """The actor as a recording behaviour (collect.Behaviour): obs [N, O], one Generator per row ->
  sampled actions [N, A] in the box, each row's noise from its own Generator."""
  sample, low, high = numpy_sampler(actor_params), space.low, space.high

  def behaviour(obs, rngs):
    noise = np.stack([r.standard_normal(low.shape, np.float32) for r in rngs])
    return low + (sample(obs, noise) + 1.0) * (high - low) / 2

  return behaviour
