"""Soft actor-critic (Haarnoja et al., 2018) in the project's functional style, to train behaviour
policies for the locomotion datasets (as D4RL did).

Pure jitted updates of an explicit state; the environment runs on the host (MuJoCo is not jittable):
every `chunk` environment steps are followed by `chunk` updates in one `lax.scan` dispatch, on
minibatches drawn on the host from a numpy replay buffer. Snapshots of the actor are taken along
training with their evaluation return, and every finished training episode is recorded (the
medium-replay data).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iwsft.datasets.collect import Episode
from iwsft.errors import UserError
from iwsft.io import progress as progress_lib


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


def make_sac(obs_dim: int, act_dim: int, cfg: SACConfig):
  """-> (init_state, update_many, act) as pure functions of explicit state."""
  actor_def, actor_p = nnx.split(Actor(obs_dim, act_dim, cfg.hidden, nnx.Rngs(cfg.seed)))
  critic_def, critic_p = nnx.split(TwinCritic(obs_dim, act_dim, cfg.hidden, nnx.Rngs(cfg.seed + 1)))
  opt = optax.adam(cfg.learning_rate)
  target_entropy = -float(act_dim)

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

  def update(state: SACState, batch):
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


@dataclasses.dataclass
class Recorded(Episode):
  """A finished training episode, ending at environment step end_step."""

  end_step: int = 0


@dataclasses.dataclass
class Snapshot:
  step: int
  eval_return: float
  actor: nnx.State
  seconds: float | None = None  # training time to this snapshot, over resumed runs too


class _Episodes:
  """Collects the learner's training episodes as they finish (env units, seeded resets)."""

  def __init__(self, env, seed: int):
    self.env, self.seed, self.done = env, seed, []
    self.start()

  def start(self) -> np.ndarray:
    obs, _ = self.env.reset(seed=self.seed)
    self.obs, self.act, self.rew = [obs], [], []
    return obs

  def add(self, action: np.ndarray, reward: float, next_obs: np.ndarray) -> None:
    self.act.append(action.astype(np.float32))
    self.rew.append(reward)
    self.obs.append(next_obs)

  def end(self, term: bool, trunc: bool, step: int) -> np.ndarray:
    """Records the finished episode (ending at environment step `step`); returns the next obs."""
    self.done.append(
      Recorded(
        np.array(self.obs),
        np.array(self.act),
        np.array(self.rew),
        bool(term),
        bool(trunc),
        self.seed,
        end_step=step,
      )
    )
    self.seed += 1
    return self.start()


def _replay_buffer(n: int, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
  z = lambda *shape: np.zeros(shape, np.float32)
  return {
    "obs": z(n, obs_dim),
    "action": z(n, act_dim),
    "reward": z(n),
    "next_obs": z(n, obs_dim),
    "terminal": z(n),
  }


def _evaluator(eval_env, act, scale, cfg: SACConfig, key):
  """evaluate(actor_params, index) -> mean return over eval_episodes of the policy's sampled
  actions: the behaviour the datasets are recorded with, so a snapshot's return estimates its
  data's."""

  def evaluate(actor_params, index: int) -> float:
    o, _ = eval_env.reset(seed=cfg.seed + 10_000 + index)
    k = jax.random.fold_in(key, index)
    ret, alive = np.zeros(cfg.eval_episodes), np.ones(cfg.eval_episodes, bool)
    while alive.any():
      k, sub = jax.random.split(k)
      a = np.asarray(act(actor_params, o.astype(np.float32), sub, False))
      o, r, te, tr, _ = eval_env.step(scale(a))
      ret += np.where(alive, r, 0.0)
      alive &= ~(te | tr)
    return float(ret.mean())

  return evaluate


@dataclasses.dataclass
class _Progress:
  """Everything a training run carries between environment steps: what a checkpoint holds.

  It is saved only at an episode boundary, where the training environment's next state is a
  function of the next reset seed (`episodes.seed`), so a resumed run continues exactly."""

  step: int
  state: SACState
  buf: dict[str, np.ndarray]
  rng: np.random.Generator
  key: jax.Array
  snapshots: list[Snapshot]
  done: list[Recorded]
  next_seed: int
  seconds: float  # training time before this process


def _save(path: str, cfg: SACConfig, run: _Progress) -> None:
  """Writes the run to `path` atomically (the replay buffer up to its step only)."""
  import pickle

  saved = dataclasses.replace(
    run,
    state=jax.device_get(run.state),
    buf={k: v[: run.step] for k, v in run.buf.items()},
    key=np.asarray(jax.random.key_data(run.key)),
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    pickle.dump({"config": cfg, "run": saved}, f, protocol=pickle.HIGHEST_PROTOCOL)
  os.replace(path + ".tmp", path)


def _same_recipe(saved: SACConfig, cfg: SACConfig) -> bool:
  """Whether two configs differ in max_steps at most: training does not depend on the step cap
  until it stops there, so a run that ended in TargetNotReached goes on exactly."""
  return dataclasses.replace(saved, max_steps=cfg.max_steps) == cfg


def _continues(saved: SACConfig, cfg: SACConfig, step: int) -> bool:
  """Whether a run saved at `step` under `saved` continues under `cfg`: the same recipe
  (_same_recipe), with a step cap no lower than the step."""
  return _same_recipe(saved, cfg) and step <= cfg.step_cap


def _load(path: str | None, cfg: SACConfig, n: int) -> _Progress | None:
  """The run saved at `path` by this recipe (_same_recipe), its buffer grown to n steps; else
  None. A cap n below its step is an error (starting over would overwrite it)."""
  import pickle

  if path is None or not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    saved = pickle.load(f)
  run = saved["run"]
  if not _same_recipe(saved["config"], cfg):
    return None
  if run.step > n:
    raise UserError(
      f"{path} holds this run at step {run.step:,}, past the step cap {n:,}: raise max_steps"
      " (or delete the file to start again)"
    )
  for k, v in run.buf.items():
    run.buf[k] = np.concatenate([v, np.zeros((n - len(v), *v.shape[1:]), v.dtype)])
  run.key = jax.random.wrap_key_data(jnp.asarray(run.key))
  return run


def _fresh(cfg: SACConfig, state: SACState, obs_dim: int, act_dim: int) -> _Progress:
  buf = _replay_buffer(cfg.step_cap, obs_dim, act_dim)
  rng, key = np.random.default_rng(cfg.seed), jax.random.key(cfg.seed + 2)
  return _Progress(0, state, buf, rng, key, [], [], cfg.seed * 1_000_003, 0.0)


def train_sac(
  env_id: str,
  cfg: SACConfig,
  env_kwargs: dict | None = None,
  progress: bool = True,
  checkpoint: str | None = None,
  checkpoint_seconds: float = 600.0,
) -> tuple[list[Snapshot], list[Recorded], Callable]:
  """Trains SAC on one environment for cfg.total_steps, then on until two snapshots in a row reach
  cfg.target_return (if set; TargetNotReached at cfg.max_steps). Returns (snapshots, recorded
  training episodes, act) where act(actor_params, obs [N, O], key, deterministic) gives actions in
  [-1, 1] (scale to the box).

  checkpoint: a file the run is saved to at the first episode end `checkpoint_seconds` after the
  last save (and at every episode end of the step cap's last snapshot interval), and resumed from
  (exactly, on the same machine) when it holds a run of this config.
  It is left in place (resuming from it ends where this run ends): the caller removes it."""
  env_kwargs = env_kwargs or {}
  env = gym.make(env_id, **env_kwargs)
  eval_env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **env_kwargs)] * cfg.eval_episodes)
  obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
  low, high = env.action_space.low, env.action_space.high
  scale = lambda a: low + (np.asarray(a) + 1.0) * (high - low) / 2
  init_state, update_many, act = make_sac(obs_dim, act_dim, cfg)
  n = cfg.step_cap
  run = _load(checkpoint, cfg, n) or _fresh(cfg, init_state(), obs_dim, act_dim)
  evaluate = _evaluator(eval_env, act, scale, cfg, jax.random.key(cfg.seed + 2))
  episodes = _Episodes(env, run.next_seed)
  episodes.done = run.done
  obs, t0, saved_at = episodes.obs[0], time.time() - run.seconds, time.time()
  bar = progress_lib.bar(n, f"SAC {env_id}", initial=run.step, enabled=progress)
  if run.step and progress:
    progress_lib.note(bar, f"SAC {env_id}: resumed at step {run.step:,} from {checkpoint}")
  for step in range(run.step, n):
    obs, ended = _env_step(env, episodes, run, act, scale, cfg, obs, step)
    if (step + 1) % cfg.chunk == 0 and step + 1 >= cfg.start_steps:
      idx = run.rng.integers(0, step + 1, (cfg.chunk, cfg.batch_size))
      run.state, _ = update_many(run.state, {k: v[idx] for k, v in run.buf.items()})
    bar.update(1)
    if (step + 1) % cfg.snapshot_every == 0:
      _snapshot(run, evaluate, step + 1, time.time() - t0, bar, f"SAC {env_id}", progress)
      if _reached(cfg, step + 1, run.snapshots):
        break
    # the last snapshot interval saves at every episode end: a raised cap then resumes close by
    last_stretch = step + 1 > n - cfg.snapshot_every
    if checkpoint and ended and (last_stretch or time.time() - saved_at >= checkpoint_seconds):
      run.step, run.next_seed, run.seconds = step + 1, episodes.seed, time.time() - t0
      _save(checkpoint, cfg, run)
      saved_at = time.time()
  bar.close()
  env.close()
  eval_env.close()
  if not _reached(cfg, n, run.snapshots):
    best = max((s.eval_return for s in run.snapshots), default=float("-inf"))
    raise TargetNotReached(
      f"SAC on {env_id} did not reach the target {cfg.target_return:.0f} in two evaluations in a"
      f" row within {n:,} steps (best {best:.0f}): raise max_steps (training resumes from its"
      " last checkpoint) or try another seed"
    )
  return run.snapshots, episodes.done, act


def _env_step(env, episodes: _Episodes, run: _Progress, act, scale, cfg: SACConfig, obs, step):
  """One training environment step at `step` (uniform actions before cfg.start_steps), stored in
  the replay buffer and the episode being recorded -> (next observation, whether an episode
  ended)."""
  if step < cfg.start_steps:
    a = run.rng.uniform(-1, 1, env.action_space.shape[0])
  else:
    run.key, sub = jax.random.split(run.key)
    a = np.asarray(act(run.state.actor, obs[None].astype(np.float32), sub, False))[0]
  next_obs, r, term, trunc, _ = env.step(scale(a))
  buf = run.buf
  buf["obs"][step], buf["action"][step], buf["reward"][step] = obs, a, r
  buf["next_obs"][step], buf["terminal"][step] = next_obs, float(term)
  episodes.add(scale(a), r, next_obs)
  if term or trunc:
    return episodes.end(term, trunc, step + 1), True
  return next_obs, False


def _snapshot(run: _Progress, evaluate, steps: int, seconds: float, bar, name: str, progress):
  """Evaluates the actor after `steps` steps and keeps it as a snapshot (one summary line)."""
  ret = evaluate(run.state.actor, len(run.snapshots))
  run.snapshots.append(Snapshot(steps, ret, jax.device_get(run.state.actor), seconds))
  bar.set_postfix(eval_return=f"{ret:.0f}", min=f"{seconds / 60:.1f}")
  if progress:
    progress_lib.note(bar, f"{name} {steps:,}/{bar.total:,} steps: eval return {ret:.1f}")


def _reached(cfg: SACConfig, steps: int, snapshots: list[Snapshot]) -> bool:
  """Whether training may stop: total_steps done and, with a target, the last two snapshots at or
  above it (one lucky evaluation is not enough)."""
  if steps < cfg.total_steps:
    return False
  last = snapshots[-2:]
  return cfg.target_return is None or (
    len(last) == 2 and min(s.eval_return for s in last) >= cfg.target_return
  )
