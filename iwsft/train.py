"""The one update step both pipelines use, sharded data-parallel over a `jax.sharding.Mesh`.

A pipeline supplies only `logprob_fn(params, batch) -> [B, T]` (per-step log-probs of its model);
everything else (the objective, the optimiser, the auxiliary policy q, the frozen reference π_ref,
in-graph sampling and multi-step dispatch) lives here, once.

Batches are dicts of arrays with a leading batch axis B: at least
  "mask":   [B, T] float  real steps / completion tokens
  "weight": [B]    float  per-sequence data weight (0 marks padding rows)
plus whatever `logprob_fn` reads (observations, actions, tokens...). The batch is split over every
device of the mesh; parameters and optimiser state are replicated (or FSDP-split, state_sharding);
XLA inserts the gradient all-reduce. The sampling pool (the dataset on the devices) has the same
layout with N sequences in place of B, padded to a multiple of the device count and split over the
devices too, so each process supplies only its own rows (pool_rows, put_pool).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from iwsft.distributed import to_host
from iwsft.errors import UserError
from iwsft.objectives import ObjectiveConfig, iw_sft_loss
from iwsft.preemption import Preempted

Params = Any
Batch = dict[str, jax.Array]
LogProbFn = Callable[[Params, Batch], jax.Array]
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
FSDP_MIN_SIZE = 2 ** 14  # elements; smaller leaves stay replicated under FSDP


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; a pytree, so it is jitted, sharded and saved whole.

  params:     the policy π_θ being trained.
  q_params:   the auxiliary policy q of iw-SFT, an exponential moving average of params.
  ref_params: the frozen reference π_ref (the data's policy, or its stand-in).
  opt_state:  optax state for params.
  step:       number of updates applied (int32 scalar).
  key:        raw uint32 PRNG key [2] for in-graph sampling (raw so checkpoints stay plain arrays).
  """

  params: Params
  q_params: Params
  ref_params: Params
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array


def prng_key(seed: int) -> jax.Array:
  """A raw uint32[2] key, the form TrainState and checkpoints hold."""
  return jax.random.key_data(jax.random.key(seed))


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int,
               ref_params: Params | None = None) -> TrainState:
  """Fresh state: q starts at params; π_ref defaults to params (fine-tuning starts from π_ref).

  Every array is copied, so the jitted steps may donate the state's buffers without deleting the
  caller's arrays.
  """
  copy = lambda t: jax.tree.map(jnp.array, t)
  params = copy(params)
  return TrainState(
      params=params,
      q_params=copy(params),
      ref_params=copy(params if ref_params is None else ref_params),
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      key=prng_key(seed),
  )


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """S independent states (or any pytrees) -> one whose every leaf has a leading seed axis [S, ...].

  `fit` trains such a state with the update vmapped over that axis: S runs (seeds) on the same data
  in one program, each with its own parameters, optimiser state and sampling key.
  """
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def stack_runs(trees: Sequence):
  """One run's pytree as it is (no seed axis); several stacked (stack_states)."""
  return trees[0] if len(trees) == 1 else stack_states(trees)


def unstack_runs(tree, count: int) -> list:
  """The inverse of stack_runs: `count` per-run pytrees."""
  return [tree] if count == 1 else [seed_slice(tree, i) for i in range(count)]


def num_seeds(state: TrainState) -> int | None:
  """S for a stacked state (stack_states), None for a single run."""
  return None if state.step.ndim == 0 else int(state.step.shape[0])


def seed_slice(tree, i: int | None):
  """Seed i of a stacked pytree; the tree itself when i is None (a single run)."""
  return tree if i is None else jax.tree.map(lambda x: x[i], tree)


def make_update(logprob_fn: LogProbFn, optimizer: optax.GradientTransformation,
                objective: ObjectiveConfig, q_decay: float = 0.9, track_bounds: bool = False,
                skip_nonfinite: bool = False) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds the pure update `update(state, batch) -> (state, metrics)` (not yet jitted).

  q_decay: q ← q_decay · q + (1 − q_decay) · θ after every step; 0 makes q the current policy
    itself (detached), as in the authors' language code, and saves a forward pass.
  track_bounds: also compute the SFT/iw-SFT bound estimates when not importance weighting (costs
    the π_ref and q forward passes that weighting needs anyway).
  skip_nonfinite: a batch whose loss or gradient is not finite leaves params, q and the optimiser
    state unchanged (metric "skipped" = 1) instead of poisoning them; the step count still advances.
  """
  if not 0.0 <= q_decay < 1.0:
    raise UserError(f"q_decay must be in [0, 1), got {q_decay}")
  need_aux = objective.uses_weights or track_bounds

  def loss_fn(params, state: TrainState, batch: Batch):
    logp = logprob_fn(params, batch)
    logp_q = logp_ref = None
    if need_aux:
      logp_ref = jax.lax.stop_gradient(logprob_fn(state.ref_params, batch))
      if q_decay == 0.0:
        logp_q = jax.lax.stop_gradient(logp)
      else:
        logp_q = jax.lax.stop_gradient(logprob_fn(state.q_params, batch))
    return iw_sft_loss(logp, logp_q, logp_ref, batch["mask"], batch["weight"], objective)

  def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    q_params = optax.incremental_update(params, state.q_params, step_size=1.0 - q_decay)
    metrics["grad_norm"] = optax.global_norm(grads)
    new = state.replace(params=params, q_params=q_params, opt_state=opt_state, step=state.step + 1)
    if skip_nonfinite:
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      keep_old = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, keep_old)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return new, metrics

  return update


# ----------------------------------------------------------------------------- sampling


def _split_leaves(data: Batch) -> tuple[int, int]:
  n, t = data["mask"].shape
  return n, t


def sample_sequences(key: jax.Array, data: Batch, logits: jax.Array, batch_size: int) -> Batch:
  """Draws batch_size sequences i.i.d. with probability ∝ exp(logits[i]); every leaf [N', ...] -> [B, ...].

  logits [N] with N <= N': rows N.. of a padded pool are never drawn, and the draw does not depend on
  how many there are (so the samples do not depend on the device count).
  """
  idx = jax.random.categorical(key, logits, shape=(batch_size,))
  return jax.tree.map(lambda x: x[idx], data)


def sample_steps(key: jax.Array, data: Batch, logits: jax.Array, batch_size: int) -> Batch:
  """Draws batch_size single steps: a sequence ∝ exp(logits) · length, then a step uniformly in it.

  logits [N] may cover fewer sequences than data holds (a pool padded with rows never drawn).

  Per-step leaves ([N, T, ...], recognised by sharing the mask's [N, T]) become [B, 1, ...];
  per-sequence leaves ([N, ...]) become [B, ...]. The result is a batch of length-1 sequences,
  so the same objective applies (the step-level batch of BC).
  """
  n, t = _split_leaves(data)
  lengths = data["mask"].sum(axis=1)[:logits.shape[0]]
  k_seq, k_step = jax.random.split(key)
  seq_logits = logits + jnp.log(jnp.maximum(lengths, 1e-30))
  idx = jax.random.categorical(k_seq, seq_logits, shape=(batch_size,))
  # Real steps of a sequence are its first `length` positions (padding is at the end).
  pos = jnp.floor(jax.random.uniform(k_step, (batch_size,)) * lengths[idx]).astype(jnp.int32)
  pos = jnp.minimum(pos, t - 1)

  def take(x):
    if x.ndim >= 2 and x.shape[:2] == (n, t):
      return x[idx, pos][:, None]
    return x[idx]

  return jax.tree.map(take, data)


# ----------------------------------------------------------------------------- mesh and jit


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over the first num_devices devices (all by default).

  Batches are split over every device (both axes); large parameters and their optimiser state are
  split over the "fsdp" axis (state_sharding) and replicated along "data". fsdp=1 is plain data
  parallelism with replicated state.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise UserError(f"asked for {num_devices} devices, {len(devices)} available")
    devices = devices[:num_devices]
  if fsdp < 1 or len(devices) % fsdp:
    raise UserError(f"fsdp {fsdp} must be a positive divisor of the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices of the mesh, the rest replicated."""
  return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))


def state_sharding(state, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
  """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs): FSDP's rule.

  A leaf of at least min_size elements is split over the "fsdp" axis along its largest dimension
  that the axis size divides; smaller leaves (biases, norms, step, key) are replicated, since
  splitting them saves little memory and costs a gather each.
  """
  n = mesh.shape[FSDP_AXIS]

  def rule(x):
    shape = tuple(x.shape)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return replicated(mesh)
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
    if not dims:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(rule, state)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size < 1 or batch_size % n:
    raise UserError(f"batch_size {batch_size} must be a positive multiple of the {n} devices")


def jit_update(update, mesh: Mesh, state_shardings=None):
  """`update(state, batch)` jitted: state (donated) placed by state_shardings (replicated if None),
  batch split over the mesh, metrics replicated."""
  st = replicated(mesh) if state_shardings is None else state_shardings
  return jax.jit(update, in_shardings=(st, batch_sharded(mesh)), out_shardings=(st, replicated(mesh)),
                 donate_argnums=0)


def make_train_steps(update, mesh: Mesh, batch_size: int, num_steps: int, step_level: bool = False,
                     vmapped: bool = False, state_shardings=None):
  """`train_steps(state, data, logits) -> (state, metrics)`: num_steps updates in one dispatch.

  Batches are sampled inside the graph from the device-resident pool `data` (put_pool: split over
  the devices) with the state's key, so there is no host round trip per step. metrics come back stacked, each [num_steps].
  vmapped: the state carries a leading seed axis (stack_states); every seed samples its own batch
  from the shared data and takes its own step; metrics are [num_steps, S].
  state_shardings: where the state lives (state_sharding's tree for FSDP); replicated if None.
  """
  check_batch_size(batch_size, mesh)
  sampler = sample_steps if step_level else sample_sequences
  shard = batch_sharded(mesh)

  def one_step(state: TrainState, data: Batch, logits: jax.Array):
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    batch = jax.lax.with_sharding_constraint(sampler(sub, data, logits, batch_size), shard)
    return update(state.replace(key=jax.random.key_data(key)), batch)

  if vmapped:  # the batch's seed axis is left unconstrained, its batch axis split over "data"
    one_step = jax.vmap(one_step, in_axes=(0, None, None))

  def train_steps(state: TrainState, data: Batch, logits: jax.Array):
    return jax.lax.scan(lambda st, _: one_step(st, data, logits), state, None, length=num_steps)

  rep = replicated(mesh)
  st = rep if state_shardings is None else state_shardings
  return jax.jit(train_steps, in_shardings=(st, shard, rep), out_shardings=(st, rep), donate_argnums=0)


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(local: Batch, mesh: Mesh) -> Batch:
  """A global batch for jit_update from this process's part of it (every leaf [B / processes, ...],
  the rows of this process's devices in order; jax.make_array_from_process_local_data)."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def pool_rows(num_rows: int, mesh: Mesh, process: int | None = None) -> tuple[np.ndarray, int]:
  """Which rows of a sampling pool of num_rows sequences a process supplies (this one by default).

  The pool is padded to a multiple of the mesh's device count and split over every device, like a
  batch. Returns (the global indices of the process's rows, ascending, in the order put_pool takes
  them [R]; the padded row count). Indices >= num_rows are padding rows, which come last.
  """
  if num_rows < 1:
    raise UserError("the sampling pool is empty")
  process = jax.process_index() if process is None else process
  n = mesh.devices.size
  padded = -(-num_rows // n) * n
  slices = batch_sharded(mesh).devices_indices_map((padded,))
  spans = sorted({(s[0].start or 0, padded if s[0].stop is None else s[0].stop)
                  for d, s in slices.items() if d.process_index == process})
  return np.concatenate([np.arange(a, b) for a, b in spans]), padded


def put_pool(local: Batch, num_rows: int, mesh: Mesh) -> Batch:
  """The global sampling pool, split over the mesh, built from this process's rows only.

  local: every leaf [R_real, ...], the real rows (< num_rows) of pool_rows(num_rows, mesh) in that
  order; zero padding rows are appended here. Returns leaves [padded, ...]
  (jax.make_array_from_process_local_data): no process ever holds the whole pool.
  """
  rows, padded = pool_rows(num_rows, mesh)
  real = int((rows < num_rows).sum())
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] != real:
      raise ValueError(f"put_pool: {x.shape[0]} local rows, this process supplies {real}")
    x = np.concatenate([x, np.zeros((len(rows) - real, *x.shape[1:]), x.dtype)])
    return jax.make_array_from_process_local_data(sharding, x, (padded, *x.shape[1:]))

  return jax.tree.map(put, local)


def shard_pool(data: Batch, mesh: Mesh) -> Batch:
  """put_pool for a pool every process holds whole on the host ([N, ...] leaves)."""
  num_rows = len(jax.tree.leaves(data)[0])
  rows, _ = pool_rows(num_rows, mesh)
  real = rows[rows < num_rows]
  return put_pool(jax.tree.map(lambda x: np.asarray(x)[real], data), num_rows, mesh)


def _first_bad_step(metrics: dict[str, np.ndarray]) -> int | None:
  """Index of the first update of a chunk whose loss or gradient norm is not finite and was not skipped."""
  bad = ~(np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"]))
  if "skipped" in metrics:
    bad &= metrics["skipped"] == 0
  return int(np.argmax(bad)) if bad.any() else None


def _chunk_row(metrics: dict[str, np.ndarray]) -> dict[str, float]:
  """Averages a chunk's per-update metrics over the updates that were applied (skipped ones count)."""
  applied = metrics["skipped"] == 0 if "skipped" in metrics else np.ones_like(metrics["loss"], bool)
  row = {}
  for k, v in metrics.items():
    if k == "skipped":
      row[k] = float(np.sum(v))
    else:
      row[k] = float(np.mean(v[applied])) if applied.any() else float("nan")
  return row


def _per_seed(fn_or_fns, count: int, what: str) -> list:
  """A callable for one run, or a sequence of `count` callables for a stacked state, as a list."""
  fns = list(fn_or_fns) if isinstance(fn_or_fns, (list, tuple)) else [fn_or_fns] * count
  if len(fns) != count:
    raise ValueError(f"{what}: {len(fns)} callables for {count} seeds")
  return fns


def fit(update, state: TrainState, data: Batch, logits, *, mesh: Mesh, name: str, steps: int,
        batch_size: int, step_level: bool = False, steps_per_dispatch: int = 100,
        eval_every: int = 0, on_eval=None, log=lambda row: None, postfix_key: str | None = None,
        checkpoints=None, best_key: str | None = None, on_resume: Callable[[int], None] | None = None,
        guard=None) -> TrainState:
  """The training loop both pipelines share: `steps` updates in jitted chunks, with a progress bar.

  data: the sampling pool, either host arrays every process holds whole ([N, ...], of which each
  process places only its rows) or the global arrays of put_pool, built from each process's share.
  logits: [N] host array, the same in every process (small: one number per sequence).
  log receives one "train" row per chunk (metrics averaged over the chunk) and one "eval" row at
  step 0, every eval_every updates and at the end, with what on_eval(params) returns.
  A stacked state (stack_states, S seeds) is trained with the update vmapped over seeds; log and
  on_eval are then either one callable for all seeds or a sequence of S (seed i gets log[i] and
  on_eval[i](params of seed i)), and the best-checkpoint metric is the mean over seeds.

  checkpoints (a checkpoint.TrainCheckpoints): if it holds a checkpoint, training resumes from the
  newest readable one, and on_resume(step) is called first (with 0 on a fresh start) so the caller
  can drop log rows written after it. A checkpoint is saved every checkpoints.every updates and at
  the end, tagged with eval row[best_key] when an evaluation just ran. Chunk boundaries depend only
  on the step count, so a resumed run dispatches exactly the computations of an uninterrupted one.
  guard (a preemption.PreemptionGuard): when it reports a signal, the loop saves and raises Preempted.
  A non-finite loss or gradient that was not skipped (make_update's skip_nonfinite) stops training
  with FloatingPointError naming the step; the last checkpoint saved is the last good state.
  """
  seeds = num_seeds(state)
  index = list(range(seeds)) if seeds else [None]  # seed_slice indices
  logs = _per_seed(log, len(index), "log")
  evals = None if on_eval is None else _per_seed(on_eval, len(index), "on_eval")
  done = 0
  abstract = jax.eval_shape(lambda: state)
  shardings = state_sharding(abstract, mesh)
  if checkpoints is not None:
    restored = checkpoints.restore_latest(abstract, shardings)
    if restored is not None:
      state, done = restored
  if on_resume is not None:
    on_resume(done)
  state = jax.device_put(state, shardings, may_alias=False)  # the caller's copy survives donation
  logits = np.asarray(logits, np.float32)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(data)):
    data = shard_pool(data, mesh)
  pool_size = len(jax.tree.leaves(data)[0])
  if pool_size != pool_rows(len(logits), mesh)[1]:
    raise ValueError(f"fit: a pool of {pool_size} rows for {len(logits)} logits on {mesh.devices.size} devices")
  logits = put_replicated(logits, mesh)
  chunk = max(1, min(steps_per_dispatch, eval_every if eval_every > 0 else steps))
  compiled = {}
  t0 = time.time()

  def evaluate(step) -> list[dict]:
    params = to_host(state.params)
    rows = []
    for i, ev, lg in zip(index, evals, logs):
      row = {"kind": "eval", "stage": name, "step": step, "time_s": round(time.time() - t0, 3)}
      row.update(ev(seed_slice(params, i)))
      lg(row)
      rows.append(row)
    return rows

  def mean_of(rows, key):
    values = [r.get(key) for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None

  if evals is not None and eval_every > 0 and done == 0:
    evaluate(0)
  with tqdm(total=steps, initial=done, desc=name, unit="step", dynamic_ncols=True, leave=False) as bar:
    while done < steps:
      n = min(chunk, steps - done)
      if eval_every > 0:
        n = min(n, eval_every - done % eval_every)
      if n not in compiled:
        compiled[n] = make_train_steps(update, mesh, batch_size, n, step_level, vmapped=bool(seeds),
                                       state_shardings=shardings)
      state, metrics = compiled[n](state, data, logits)
      metrics = to_host(metrics)
      per_seed = [metrics if i is None else {k: v[:, i] for k, v in metrics.items()} for i in index]
      bad = [(b, i) for i, m in zip(index, per_seed) if (b := _first_bad_step(m)) is not None]
      if bad:
        b, i = min(bad, key=lambda t: t[0])
        if checkpoints is not None:
          checkpoints.wait()
        last = checkpoints.steps()[-1:] if checkpoints is not None else []
        raise FloatingPointError(
            f"{name}: non-finite loss or gradient at step {done + b + 1}"
            + ("" if i is None else f" (seed index {i})")
            + (f"; last good checkpoint: step {last[0]} in {checkpoints.directory}" if last else ""))
      previous, done = done, done + n
      train_rows = []
      for m, lg in zip(per_seed, logs):
        row = {"kind": "train", "stage": name, "step": done, "time_s": round(time.time() - t0, 3),
               **_chunk_row(m)}
        lg(row)
        train_rows.append(row)
      bar.update(n)
      postfix = {"loss": f"{mean_of(train_rows, 'loss'):.3f}"}
      eval_rows = None
      if evals is not None and ((eval_every > 0 and done % eval_every == 0) or done == steps):
        eval_rows = evaluate(done)
        shown = mean_of(eval_rows, postfix_key) if postfix_key else None
        if shown is not None:
          postfix[postfix_key] = f"{shown:.3g}"
      bar.set_postfix(postfix)
      stopping = guard is not None and guard.requested and done < steps
      if checkpoints is not None and (checkpoints.due(done, previous) or done == steps
                                      or eval_rows is not None or stopping):
        checkpoints.save(done, state, None if eval_rows is None or best_key is None
                         else mean_of(eval_rows, best_key))
      if stopping:
        if checkpoints is not None:
          checkpoints.wait()
        raise Preempted(name, done, checkpoints.directory if checkpoints is not None else None)
  if checkpoints is not None:
    checkpoints.wait()
  return state
