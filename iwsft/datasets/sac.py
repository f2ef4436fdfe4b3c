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
import time
from collections.abc import Callable

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iwsft import envs as envs_lib
from iwsft.datasets import sac_store
from iwsft.datasets.collect import Episode
from iwsft.datasets.sac_agent import (
  Actor,
  SACConfig,
  SACState,
  TargetNotReached,
  make_sac,
  numpy_behaviour,
  numpy_sampler,
)
from iwsft.errors import UserError
from iwsft.io import progress as progress_lib

__all__ = [
  "Actor",
  "Recorded",
  "SACConfig",
  "SACState",
  "Snapshot",
  "TargetNotReached",
  "make_sac",
  "numpy_behaviour",
  "numpy_sampler",
  "train_sac",
]


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
  """Writes the run to directory `path` (sac_store; the replay buffer up to its step only)."""
  arrays = {
    **sac_store.tree_arrays("state", jax.device_get(run.state)),
    **{f"buf.{k}": v[: run.step] for k, v in run.buf.items()},
    "key": np.asarray(jax.random.key_data(run.key)),
    **_snapshot_arrays(run.snapshots),
    **sac_store.episodes_arrays("done", run.done, extra=("end_step",)),
  }
  meta = {
    "config": sac_store.config_json(cfg),
    "step": run.step,
    "next_seed": run.next_seed,
    "seconds": run.seconds,
    "rng": run.rng.bit_generator.state,
    "snapshots": _snapshot_meta(run.snapshots),
  }
  sac_store.write(path, arrays, meta)


def _snapshot_arrays(snapshots: list[Snapshot]) -> dict[str, np.ndarray]:
  return {
    k: v
    for i, s in enumerate(snapshots)
    for k, v in sac_store.tree_arrays(f"actor{i}", s.actor).items()
  }


def _snapshot_meta(snapshots: list[Snapshot]) -> list[dict]:
  return [{"step": s.step, "eval_return": s.eval_return, "seconds": s.seconds} for s in snapshots]


def _snapshots_from(arrays: dict, meta: list[dict], actor) -> list[Snapshot]:
  """The snapshots _snapshot_arrays/_snapshot_meta stored, on the structure of actor params."""
  return [
    Snapshot(
      m["step"], m["eval_return"], sac_store.tree_from(f"actor{i}", arrays, actor), m["seconds"]
    )
    for i, m in enumerate(meta)
  ]


def write_behaviour(path: str, cfg: SACConfig, snapshots: list, episodes: list, seconds: float):
  """A finished run's behaviour cache: its snapshots and recorded training episodes."""
  arrays = {
    **_snapshot_arrays(snapshots),
    **sac_store.episodes_arrays("episodes", episodes, extra=("end_step",)),
  }
  meta = {
    "config": sac_store.config_json(cfg),
    "seconds": seconds,
    "snapshots": _snapshot_meta(snapshots),
  }
  sac_store.write(path, arrays, meta)


def read_behaviour(path: str, obs_dim: int, act_dim: int):
  """(config, snapshots, episodes, seconds) of the cache write_behaviour wrote; None if none."""
  got = sac_store.read(path)
  if got is None:
    return None
  arrays, meta = got
  cfg = sac_store.config_from(meta["config"])
  actor = nnx.state(Actor(obs_dim, act_dim, cfg.hidden, nnx.Rngs(0)))
  snapshots = _snapshots_from(arrays, meta["snapshots"], actor)
  episodes = sac_store.episodes_from("episodes", arrays, Recorded, ("end_step",))
  return cfg, snapshots, episodes, meta["seconds"]


def _same_recipe(saved: SACConfig, cfg: SACConfig) -> bool:
  """Whether two configs differ in max_steps at most: training does not depend on the step cap
  until it stops there, so a run that ended in TargetNotReached goes on exactly."""
  return dataclasses.replace(saved, max_steps=cfg.max_steps) == cfg


def _continues(saved: SACConfig, cfg: SACConfig, step: int) -> bool:
  """Whether a run saved at `step` under `saved` continues under `cfg`: the same recipe
  (_same_recipe), with a step cap no lower than the step."""
  return _same_recipe(saved, cfg) and step <= cfg.step_cap


def _load(path: str | None, cfg: SACConfig, n: int, init_state) -> _Progress | None:
  """The run saved at `path` by this recipe (_same_recipe), its buffer grown to n steps, on the
  structure of init_state()'s state (traced, not computed); else None. A cap n below its step is
  an error (starting over would overwrite it)."""
  got = None if path is None else sac_store.read(path)
  if got is None:
    return None
  arrays, meta = got
  template = jax.eval_shape(init_state)
  if not _same_recipe(sac_store.config_from(meta["config"]), cfg):
    return None
  if meta["step"] > n:
    raise UserError(
      f"{path} holds this run at step {meta['step']:,}, past the step cap {n:,}: raise max_steps"
      " (or delete it to start again)"
    )
  buf = {}
  for k in (k.removeprefix("buf.") for k in arrays if k.startswith("buf.")):
    v = arrays[f"buf.{k}"]
    buf[k] = np.concatenate([v, np.zeros((n - len(v), *v.shape[1:]), v.dtype)])
  rng = np.random.default_rng()
  rng.bit_generator.state = meta["rng"]
  return _Progress(
    step=meta["step"],
    state=sac_store.tree_from("state", arrays, template),
    buf=buf,
    rng=rng,
    key=jax.random.wrap_key_data(jnp.asarray(arrays["key"])),
    snapshots=_snapshots_from(arrays, meta["snapshots"], template.actor),
    done=sac_store.episodes_from("done", arrays, Recorded, ("end_step",)),
    next_seed=meta["next_seed"],
    seconds=meta["seconds"],
  )


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

  checkpoint: a directory the run is saved to (sac_store) at the first episode end
  `checkpoint_seconds` after the last save (and at every episode end of the last snapshot
  interval), and resumed from (exactly, on the same machine) when it holds a run of this config.
  It is left in place (resuming from it ends where this run ends): the caller removes it."""
  env_kwargs = env_kwargs or {}
  env = envs_lib.make(env_id, **env_kwargs)
  eval_env = gym.vector.SyncVectorEnv(
    [lambda: envs_lib.make(env_id, **env_kwargs)] * cfg.eval_episodes
  )
  obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
  low, high = env.action_space.low, env.action_space.high
  scale = lambda a: low + (np.asarray(a) + 1.0) * (high - low) / 2
  init_state, update_many, act = make_sac(obs_dim, act_dim, cfg)
  n = cfg.step_cap
  run = _load(checkpoint, cfg, n, init_state) or _fresh(cfg, init_state(), obs_dim, act_dim)
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
