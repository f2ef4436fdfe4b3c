"""The one update step both pipelines use, and the multi-step dispatch that samples its batches.

A pipeline supplies only `logprob_fn(params, batch) -> [B, T]` (per-step log-probs of its model);
the objective, the optimiser, the auxiliary policy q, the frozen reference π_ref and in-graph
batch sampling live here, once. A state with frozen parameters (TrainState.frozen: a LoRA's base
model) trains only its params; logprob_fn is then given state.whole(params, frozen).

Batches are dicts of arrays with a leading batch axis B: at least
  "mask":   [B, T] float  real steps / completion tokens
  "weight": [B]    float  per-sequence data weight (0 marks padding rows)
plus whatever `logprob_fn` reads (observations, actions, tokens...), and optionally
  "logp_ref": [B, T] float  π_ref's step log-probs, computed once ahead (π_ref is frozen)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from iwsft.core.objectives import ObjectiveConfig, iw_sft_loss, loss_coefficients
from iwsft.core.packing import distinct_steps, gather_packed
from iwsft.core.sharding import (
  batch_sharded,
  check_batch_size,
  replicated,
  seed_pool_sharded,
  seed_sharded,
)
from iwsft.core.state import TrainState, update_q, whole

Batch = dict[str, jax.Array]
LogProbFn = Callable[[Any, Batch], jax.Array]


def make_update(
  logprob_fn: LogProbFn,
  optimizer: optax.GradientTransformation,
  objective: ObjectiveConfig,
  track_bounds: bool = False,
  skip_nonfinite: bool = False,
  micro_batches: int = 1,
  ref_logprob_fn: LogProbFn | None = None,
  trunk_fn: Callable[[Any, Batch], Batch] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds the pure update `update(state, batch) -> (state, metrics)` (not yet jitted).

  After every step q ← q_decay · q + (1 − q_decay) · θ (objective.q_decay); 0 makes q the current
    policy itself (detached), as in the authors' language code, and saves a forward pass.
  track_bounds: also compute the SFT/iw-SFT bound estimates when not importance weighting (costs
    the π_ref and q forward passes that weighting needs anyway).
  skip_nonfinite: a batch whose loss or gradient is not finite leaves params, q and the optimiser
    state unchanged (metric "skipped" = 1) instead of poisoning them; the step count still advances.
  micro_batches: the gradient accumulated over this many micro-batches of the batch (rows i,
    i + k, i + 2k, ... form the i-th, so each spreads over the devices like the batch), computed
    one after another: the same update as the whole batch at once (the weights, their
    self-normalisation and the loss's denominators are the whole batch's, objectives.
    loss_coefficients), with the activations of one micro-batch at a time. Every leaf of the
    batch needs the leading batch axis (padded batches, not packed ones).
  ref_logprob_fn: π_ref's log-probs from its params when the batch has no "logp_ref" (default
    logprob_fn), e.g. an LM's distribution at its sampling temperature.
  trunk_fn: `trunk_fn(params, batch) -> batch` adds to each (micro-)batch what θ, q and π_ref
    share, computed once from the state's params, e.g. a frozen trunk's output
    (lm.model.make_trunk_fn), which logprob_fn (and ref_logprob_fn) then start from.
  """
  if micro_batches < 1:
    raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
  gradients = _Gradients(
    logprob_fn, objective, track_bounds, micro_batches, ref_logprob_fn, trunk_fn
  )

  def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    grads, metrics = gradients(state.params, state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    q_params = update_q(state.q_params, params, objective.q_decay)
    metrics["grad_norm"] = optax.global_norm(grads)
    new = state.replace(params=params, q_params=q_params, opt_state=opt_state, step=state.step + 1)
    if skip_nonfinite:
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      keep_old = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, keep_old)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return new, metrics

  return update


class _Gradients:
  """`(params, state, batch) -> (grads, metrics)` of iw_sft_loss for make_update: at once, or
  accumulated over micro-batches."""

  def __init__(
    self, logprob_fn, objective, track_bounds: bool, micro_batches: int, ref_fn=None, trunk_fn=None
  ):
    self.logprob_fn, self.objective, self.micro_batches = logprob_fn, objective, micro_batches
    self.ref_fn, self.trunk_fn = ref_fn or logprob_fn, trunk_fn
    self.need_aux = objective.uses_weights or track_bounds

  def prepare(self, state: TrainState, batch: Batch) -> Batch:
    """The batch with what θ, q and π_ref share (trunk_fn of the state's params), once."""
    if self.trunk_fn is None:
      return batch
    return self.trunk_fn(whole(state.params, state.frozen), batch)

  def logprob(self, state: TrainState, params, batch: Batch):
    """logprob_fn of the model with these (trained) params and the state's frozen ones."""
    return self.logprob_fn(whole(params, state.frozen), batch)

  def ref_logprobs(self, state: TrainState, batch: Batch):
    if "logp_ref" in batch:  # π_ref is frozen: its log-probs may be computed once, ahead
      return batch["logp_ref"]
    if state.ref_params is None:
      raise ValueError("the state holds no π_ref (keep_ref=False): pass batch['logp_ref']")
    return jax.lax.stop_gradient(self.ref_fn(whole(state.ref_params, state.frozen), batch))

  def q_logprobs(self, state: TrainState, batch: Batch, logp):
    """q's log-probs: θ's own, detached, when q_decay is 0 (logp: θ's)."""
    q_decay = self.objective.q_decay
    if q_decay == 0.0:
      return jax.lax.stop_gradient(logp)
    if state.q_params is None:
      raise ValueError(f"the state holds no q (keep_q=False) but q_decay is {q_decay}")
    return jax.lax.stop_gradient(self.logprob(state, state.q_params, batch))

  def loss(self, params, state: TrainState, batch: Batch):
    batch = self.prepare(state, batch)
    logp = self.logprob(state, params, batch)
    logp_q = logp_ref = None
    if self.need_aux:
      logp_ref = self.ref_logprobs(state, batch)
      logp_q = self.q_logprobs(state, batch, logp)
    return iw_sft_loss(logp, logp_q, logp_ref, batch["mask"], batch["weight"], self.objective)

  def aux_logprobs(self, state: TrainState, batch: Batch):
    """(logp_q, logp_ref) [B, T] of one micro-batch, constants; (None, None) without weighting."""
    if not self.need_aux:
      return None, None
    logp = self.logprob(state, state.params, batch) if self.objective.q_decay == 0.0 else None
    return self.q_logprobs(state, batch, logp), self.ref_logprobs(state, batch)

  def __call__(self, params, state: TrainState, batch: Batch):
    if self.micro_batches == 1:
      return jax.grad(self.loss, has_aux=True)(params, state, batch)
    k, mask, weight = self.micro_batches, batch["mask"], batch["weight"]
    parts = _split(batch, k)
    if self.trunk_fn is not None:
      parts = jax.lax.map(lambda mb: self.prepare(state, mb), parts)
    _, aux = jax.lax.scan(lambda c, mb: (c, self.aux_logprobs(state, mb)), None, parts)
    logp_q, logp_ref = jax.tree.map(_join, aux)
    coef = loss_coefficients(logp_q, logp_ref, mask, weight, self.objective)

    def add(total, part):
      mb, c = part
      surrogate = lambda p: _surrogate(self.logprob(state, p, mb), c)
      grad, logp = jax.grad(surrogate, has_aux=True)(params)
      return jax.tree.map(jnp.add, total, grad), logp

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, logp = jax.lax.scan(add, zeros, (parts, _split(coef, k)))
    logp = jax.lax.stop_gradient(_join(logp))  # the whole batch's metrics, from its log-probs
    _, metrics = iw_sft_loss(logp, logp_q, logp_ref, mask, weight, self.objective)
    return grads, metrics


def state_parts(objective: ObjectiveConfig, track_bounds: bool, ref_precomputed: bool) -> dict:
  """Which model copies an update of make_update(objective, track_bounds) reads, as init_state's
  keep_q / keep_ref: q only when it lags (q_decay > 0), π_ref only when its log-probs are not in
  the batches; neither without weighting or bounds."""
  need = objective.uses_weights or track_bounds
  return {"keep_q": need and objective.q_decay > 0, "keep_ref": need and not ref_precomputed}


def _surrogate(logp: jax.Array, coef: jax.Array):
  """Σ coef · logp, whose gradient is the loss's (objectives.loss_coefficients), and logp."""
  return jnp.sum(coef * logp), logp


def _split(tree, k: int):
  """Leaves [B, ...] -> [k, B / k, ...]; part i holds rows i, i + k, i + 2k, ..."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"micro_batches {k} must divide the batch's leading axis {x.shape}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, tree)


def _join(x):
  """_split's inverse for one leaf: [k, B / k, ...] -> [B, ...]."""
  return None if x is None else jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def pool_logprobs(
  logprob_fn: LogProbFn, params, data: Batch, mesh, vmapped: bool = False, rows: int = 16
) -> jax.Array:
  """logprob_fn over every row of a placed pool (put_pool), once: π_ref's log-probs, for the
  make_train_steps seed_data "logp_ref" (π_ref is frozen, so no batch needs to recompute them).

  Returns [N', T], or [S, N', T] for params with a leading seed axis (vmapped), split over the
  devices as the pool. Rows are computed `rows` at a time, so memory stays that of a batch.
  """

  def over_pool(p, d):
    one = lambda row: logprob_fn(p, jax.tree.map(lambda x: x[None], row))[0]
    return jax.lax.map(one, d, batch_size=rows)

  out = seed_pool_sharded(mesh, vmapped)
  fn = jax.vmap(over_pool, in_axes=(0, None)) if vmapped else over_pool
  return jax.jit(fn, out_shardings=out)(params, data)


def draw_sequences(
  key: jax.Array, logits: jax.Array, batch_size: int, inverse_cdf: bool = False
) -> jax.Array:
  """batch_size sequence indices [B] drawn i.i.d. with probability ∝ exp(logits[i]), logits [N].

  Rows N.. of a pool padded beyond the logits are never drawn, and the draw does not depend on how
  many there are (so the samples do not depend on the device count).
  inverse_cdf: one uniform per draw and a search of the cumulative probabilities, instead of
    Gumbel-max's B × N random numbers (256 draws from 2,000 episodes: 26 ms against 0.8 ms on 2 CPU
    cores). The same distribution, another random stream; False keeps the stream the language
    pipeline's published numbers were made with.
  """
  if inverse_cdf:
    return jax.random.choice(key, logits.shape[0], (batch_size,), p=jax.nn.softmax(logits))
  return jax.random.categorical(key, logits, shape=(batch_size,))


def sample_sequences(
  key: jax.Array, data: Batch, logits: jax.Array, batch_size: int, inverse_cdf: bool = False
) -> Batch:
  """The padded batch of draw_sequences: every leaf [N', ...] -> [B, ...]."""
  idx = draw_sequences(key, logits, batch_size, inverse_cdf)
  return jax.tree.map(lambda x: x[idx], data)


def sample_steps(
  key: jax.Array, data: Batch, logits: jax.Array, batch_size: int, inverse_cdf: bool = False
) -> Batch:
  """Draws batch_size single steps: a sequence ∝ exp(logits) · length, then a step uniformly in it.

  logits [N] may cover fewer sequences than data holds (a pool padded with rows never drawn).

  Per-step leaves ([N, T, ...], recognised by sharing the mask's [N, T]) become [B, 1, ...];
  per-sequence leaves ([N, ...]) become [B, ...]. The result is a batch of length-1 sequences,
  so the same objective applies (the step-level batch of BC).
  """
  n, t = data["mask"].shape
  lengths = data["mask"].sum(axis=1)[: logits.shape[0]]
  k_seq, k_step = jax.random.split(key)
  seq_logits = logits + jnp.log(jnp.maximum(lengths, 1e-30))
  idx = draw_sequences(k_seq, seq_logits, batch_size, inverse_cdf)
  # Real steps of a sequence are its first `length` positions (padding is at the end).
  pos = jnp.floor(jax.random.uniform(k_step, (batch_size,)) * lengths[idx]).astype(jnp.int32)
  pos = jnp.minimum(pos, t - 1)

  def take(x):
    if x.ndim >= 2 and x.shape[:2] == (n, t):
      return x[idx, pos][:, None]
    return x[idx]

  return jax.tree.map(take, data)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a stage draws its batches and dispatches its updates (fit, make_train_steps).

  steps: updates of the stage; batch_size: sequences (or single steps) per update.
  step_level: draw single steps ∝ their sequence's probability instead of whole sequences.
  steps_per_dispatch: updates per jitted call (a lax.scan), cut at evaluations and the end.
  capacity: sequence batches are packed into this many step slots (core.packing; the update's
    logprob_fn must take packed batches, packing.markov_logprob), and a step whose batch holds
    more distinct real steps, in any seed, is computed padded; metrics add "batch/steps" (the
    distinct sequences' real steps) and "batch/padded" (1 for such a step). None: always padded.
    Ignored for step-level batches.
  inverse_cdf: how sequences are drawn (draw_sequences: the same distribution, a cheaper stream
    for large pools).
  """

  steps: int
  batch_size: int
  step_level: bool = False
  steps_per_dispatch: int = 100
  capacity: int | None = None
  inverse_cdf: bool = False


def _split_key(state: TrainState):
  key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
  return jax.random.key_data(key), sub


def _scanned_steps(update, sampling: Sampling, capacity, shard, vmapped: bool, num_steps: int):
  """The unjitted `train_steps`: num_steps updates in a lax.scan, batches drawn in the graph."""
  batch_size, step_level, inverse_cdf = (
    sampling.batch_size,
    sampling.step_level,
    sampling.inverse_cdf,
  )
  seeded = jax.vmap if vmapped else (lambda f: f)  # seed axis left unconstrained in the batch

  def train_steps(state: TrainState, data: Batch, logits: jax.Array, seed_data: Batch):
    lengths = data["mask"].sum(axis=1).astype(jnp.int32)

    def take(state, sd, key, batch_of):
      batch = batch_of({**data, **sd})
      if shard is not None:  # None: seeds over devices, each seed's batch whole on its device
        batch = jax.lax.with_sharding_constraint(batch, shard)
      return update(state.replace(key=key), batch)

    def padded_step(state: TrainState, _):
      key, sub = seeded(_split_key)(state)
      sampler = sample_steps if step_level else sample_sequences
      draw = lambda s: lambda d: sampler(s, d, logits, batch_size, inverse_cdf)
      return seeded(lambda st, sd, k, s: take(st, sd, k, draw(s)))(state, seed_data, key, sub)

    def packed_step(state: TrainState, _):
      key, sub = seeded(_split_key)(state)
      idx = seeded(lambda s: draw_sequences(s, logits, batch_size, inverse_cdf))(sub)
      steps = seeded(lambda i: distinct_steps(i, lengths))(idx)
      fits = jnp.max(steps) <= capacity
      packed = lambda i: lambda d: gather_packed(d, i, lengths, capacity)
      padded = lambda i: lambda d: jax.tree.map(lambda x: x[i], d)

      def step_with(gather):
        per_seed = lambda st, sd, k, i: take(st, sd, k, gather(i))
        return lambda st: seeded(per_seed)(st, seed_data, key, idx)

      state, metrics = jax.lax.cond(fits, step_with(packed), step_with(padded), state)
      fell_back = jnp.broadcast_to(1.0 - fits.astype(jnp.float32), steps.shape)
      return state, {**metrics, "batch/steps": steps.astype(jnp.float32), "batch/padded": fell_back}

    one_step = padded_step if capacity is None else packed_step
    return jax.lax.scan(one_step, state, None, length=num_steps)

  return train_steps


def make_train_steps(
  update,
  mesh,
  sampling: Sampling,
  num_steps: int,
  *,
  vmapped: bool = False,
  state_shardings=None,
  seeds_over_devices: bool = False,
):
  """`train_steps(state, data, logits, seed_data) -> (state, metrics)`: num_steps updates in one
  dispatch, with batches drawn as `sampling` says (its steps and steps_per_dispatch are fit's).
  The state's buffers are donated, but for its frozen parameters (the caller's, never copied).

  Batches are sampled inside the graph from the device-resident pool `data` (put_pool: split over
  the devices) with the state's key, so there is no host round trip per step; metrics come
  back stacked, each [num_steps]. The steps are traced with `mesh` as JAX's context mesh
  (jax.set_mesh), where a model's own partitioned kernels (lm.splash) read it.
  vmapped: the state carries a leading seed axis (state.stack_seeds); every seed samples its own
    batch from the shared data and takes its own step; metrics are [num_steps, S].
  seed_data: pool leaves that differ per seed (π_ref's "logp_ref" [N', T]), joined to that seed's
    pool; [S, N', ...] when vmapped (seed_pool_sharded), {} for none.
  state_shardings: where the state lives (state_sharding's tree for FSDP); replicated if None.
  seeds_over_devices: the vmapped seeds split over the devices instead of each batch
    (sharding.seed_mesh: the state and seed_data split along their seed axis, the pool whole on
    every device; the mesh's devices must divide the seeds).
  """
  capacity = None if sampling.step_level else sampling.capacity
  rep = replicated(mesh)
  if seeds_over_devices:
    if not vmapped:
      raise ValueError("make_train_steps: seeds_over_devices needs a seed axis (vmapped)")
    shard, pool, seed_data = None, rep, seed_sharded(mesh)
    st = seed_sharded(mesh) if state_shardings is None else state_shardings
  else:
    check_batch_size(sampling.batch_size, mesh)
    shard = pool = batch_sharded(mesh)
    seed_data = seed_pool_sharded(mesh, vmapped)
    st = rep if state_shardings is None else state_shardings
    if capacity is not None:  # packed leaves are split over the devices too
      capacity = -(-capacity // mesh.devices.size) * mesh.devices.size
  train_steps = _scanned_steps(update, sampling, capacity, shard, vmapped, num_steps)

  def steps_on(state, frozen, data, logits, seed_data):  # frozen: an argument never donated
    state, metrics = train_steps(state.replace(frozen=frozen), data, logits, seed_data)
    return state.replace(frozen=None), metrics

  trained, frozen = (st.replace(frozen=None), st.frozen) if isinstance(st, TrainState) else (st, st)
  jitted = jax.jit(
    steps_on,
    in_shardings=(trained, frozen, pool, rep, seed_data),
    out_shardings=(trained, rep),
    donate_argnums=0,
  )

  def run(state, data, logits, seed_data=None):
    with jax.set_mesh(mesh):  # the context mesh of a model that partitions its own kernels
      new, metrics = jitted(state.replace(frozen=None), state.frozen, data, logits, seed_data or {})
    return new.replace(frozen=state.frozen), metrics

  return run
