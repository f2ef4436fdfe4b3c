"""The host loop both pipelines share: `fit` runs a stage's updates in jitted chunks.

Host work per chunk is one dispatch of `steps_per_dispatch` updates (batches sampled in the graph)
and one transfer of the stacked metrics. What the loop reports to and asks of its caller (logs,
evaluations, checkpoints, resumption, clean stops) is gathered in one `Hooks` object.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from iwsft.core.sharding import (
  pool_rows,
  put_replicated,
  replicated,
  seed_mesh,
  seed_pool_sharded,
  seed_sharded,
  shard_pool,
  state_sharding,
)
from iwsft.core.state import TrainState, num_seeds, seed_slice
from iwsft.core.step import Sampling, make_train_steps
from iwsft.io import progress
from iwsft.io.distributed import to_host
from iwsft.io.preemption import Preempted

Row = dict
Log = Callable[[Row], None]


@dataclasses.dataclass
class Hooks:
  """The caller's side of `fit`. Sequences hold one entry per seed (one for a single run).

  logs: receive one "train" row per chunk (metrics averaged over it) and the "eval" rows.
  evaluate: evaluate[i] maps seed i's params to a dict, at step 0, every eval_every updates and the
    end; None for no evaluation.
  checkpoints: an io.checkpoint.TrainCheckpoints: the stage resumes from its newest readable step,
    saves every checkpoints.every updates, at evaluations and at the end.
  best_key: the eval row's key whose mean over seeds tags a checkpoint for "best" retention.
  on_resume(step): called before training with the step resumed from (0 on a fresh start), so the
    caller can drop log rows written after it.
  guard: an io.preemption.PreemptionGuard; when it reports a signal, the loop saves and raises
    Preempted.
  postfix_key: the eval row's key shown on the progress bar.
  """

  logs: Sequence[Log] = (lambda row: None,)
  evaluate: Sequence[Callable[..., dict]] | None = None
  eval_every: int = 0
  checkpoints: object | None = None
  best_key: str | None = None
  on_resume: Callable[[int], None] | None = None
  guard: object | None = None
  postfix_key: str | None = None


def fit(
  update,
  state: TrainState,
  data,
  logits,
  sampling: Sampling,
  *,
  mesh: Mesh,
  name: str,
  hooks: Hooks | None = None,
  seed_data=None,
  seeds_over_devices: bool = False,
  split=None,
) -> TrainState:
  """Trains `state` for sampling.steps updates of `update` on batches drawn from `data`.

  data: the sampling pool, either host arrays every process holds whole ([N, ...], of which each
    process places only its rows) or the global arrays of sharding.put_pool.
  logits: [N] host array, the same in every process: sequence i is drawn ∝ exp(logits[i]).
  sampling: batch size, steps, packing and dispatch (step.Sampling).
  seed_data: pool leaves that differ per seed, as make_train_steps takes them (π_ref's log-probs
    from step.pool_logprobs), or None.
  A state with a seed axis (state.stack_seeds) is trained with the update vmapped over seeds;
  seeds_over_devices splits those seeds over the mesh's devices (sharding.seed_mesh: as many
  devices as share the seeds evenly, each training its seeds on whole batches from the whole
  pool) instead of splitting every batch over all devices.
  split: which dimension of each state leaf the mesh's model axis splits (tensor parallelism,
  sharding.state_sharding's split), or None.
  Chunk boundaries depend only on the step count, so a resumed run dispatches exactly the
  computations of an uninterrupted one. A non-finite loss or gradient that was not skipped stops
  training with FloatingPointError naming the step; the last checkpoint saved is the last good
  state.
  """
  steps = sampling.steps
  mesh = _fit_mesh(mesh, state, seeds_over_devices)
  run = _Run(name, state, hooks or Hooks(), mesh, seeds_over_devices, split)
  state, done = run.start(state)
  data, logits = _place_pool(data, logits, mesh, seeds_over_devices)
  seed_data = _place_seed_data(seed_data, data, mesh, run.seeds is not None, seeds_over_devices)
  chunk = max(1, min(sampling.steps_per_dispatch, run.hooks.eval_every or steps))
  compiled = {}
  if run.hooks.evaluate is not None and run.hooks.eval_every > 0 and done == 0:
    run.evaluate(state, 0)
  with progress.bar(steps, name, initial=done) as bar:
    while done < steps:
      n = _next_chunk(done, steps, chunk, run.hooks.eval_every)
      if n not in compiled:
        layout = dict(state_shardings=run.shardings, seeds_over_devices=seeds_over_devices)
        vmapped = run.seeds is not None
        compiled[n] = make_train_steps(update, mesh, sampling, n, vmapped=vmapped, **layout)
      state, metrics = compiled[n](state, data, logits, seed_data)
      previous, done = done, done + n
      postfix = run.after_chunk(to_host(metrics), previous, done)
      eval_rows = _evaluate_due(run, state, done, steps, postfix, bar)
      bar.update(n)
      bar.set_postfix(postfix)
      run.save_or_stop(state, previous, done, steps, eval_rows)
  run.finish()
  return state


def _evaluate_due(run, state: TrainState, done: int, steps: int, postfix: dict, bar):
  """The evaluation rows at step `done` when one is due (else None), its score added to the
  progress postfix and noted as the log's one summary line."""
  if not run.eval_due(done, steps):
    return None
  eval_rows = run.evaluate(state, done)
  shown = _mean_of(eval_rows, run.hooks.postfix_key)
  if shown is not None:
    postfix[run.hooks.postfix_key] = f"{shown:.3g}"
  line = ", ".join(f"{k} {v}" for k, v in postfix.items())
  progress.note(bar, f"{run.name} {done}/{steps}: {line}")
  return eval_rows


def _fit_mesh(mesh: Mesh, state: TrainState, seeds_over_devices: bool) -> Mesh:
  """The mesh fit trains on: `mesh`, or with seeds_over_devices the devices sharing the seeds."""
  if not seeds_over_devices:
    return mesh
  if num_seeds(state) is None:
    raise ValueError("fit: seeds_over_devices needs a state with a seed axis (stack_seeds)")
  return seed_mesh(mesh, num_seeds(state))


def _next_chunk(done: int, steps: int, chunk: int, eval_every: int) -> int:
  """Updates in the next dispatch: a full chunk, cut at the end and at the next evaluation."""
  n = min(chunk, steps - done)
  return min(n, eval_every - done % eval_every) if eval_every > 0 else n


def _place_pool(data, logits, mesh: Mesh, whole: bool = False):
  """The pool split over the mesh (if still on the host), or `whole` on every device, and the
  logits replicated; checked."""
  logits = np.asarray(logits, np.float32)
  if whole:  # the rows past len(logits) (another mesh's padding) are never drawn
    data = jax.device_put(data, replicated(mesh))
    if len(jax.tree.leaves(data)[0]) < len(logits):
      raise ValueError(f"fit: a pool of fewer rows than its {len(logits)} logits")
    return data, put_replicated(logits, mesh)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(data)):
    data = shard_pool(data, mesh)
  pool_size = len(jax.tree.leaves(data)[0])
  if pool_size != pool_rows(len(logits), mesh)[1]:
    raise ValueError(
      f"fit: a pool of {pool_size} rows for {len(logits)} logits on {mesh.devices.size} devices"
    )
  return data, put_replicated(logits, mesh)


def _place_seed_data(seed_data, data, mesh: Mesh, vmapped: bool, by_seed: bool = False) -> dict:
  """Per-seed pool leaves on the mesh ([S, N', ...] if vmapped, else [N', ...]), split as the pool
  or, `by_seed`, over their seed axis; checked against the pool's N' rows."""
  if not seed_data:
    return {}
  rows = len(jax.tree.leaves(data)[0])
  sharding = seed_sharded(mesh) if by_seed else seed_pool_sharded(mesh, vmapped)
  for k, x in seed_data.items():
    if x.shape[int(vmapped)] != rows:
      raise ValueError(f"fit: seed_data[{k!r}] has shape {x.shape} for a pool of {rows} rows")
  return {
    k: x if isinstance(x, jax.Array) and x.sharding == sharding else jax.device_put(x, sharding)
    for k, x in seed_data.items()
  }


def _mean_of(rows: Sequence[Row] | None, key: str | None) -> float | None:
  values = [r.get(key) for r in rows or () if key and r.get(key) is not None]
  return float(np.mean(values)) if values else None


class _Run:
  """One stage's bookkeeping around the dispatches: seeds, rows, checkpoints and stops."""

  def __init__(
    self, name: str, state: TrainState, hooks: Hooks, mesh: Mesh, by_seed: bool, split=None
  ):
    self.name, self.hooks, self.t0 = name, hooks, time.time()
    self.seeds = num_seeds(state)
    self.index = list(range(self.seeds)) if self.seeds else [None]  # seed_slice indices
    self.logs = _per_seed(hooks.logs, len(self.index), "logs")
    self.evals = (
      None if hooks.evaluate is None else _per_seed(hooks.evaluate, len(self.index), "evaluate")
    )
    self.abstract = jax.eval_shape(lambda: state)
    if by_seed:
      self.shardings = jax.tree.map(lambda _: seed_sharded(mesh), self.abstract)
    else:
      self.shardings = state_sharding(self.abstract, mesh, split=split)

  def start(self, state: TrainState) -> tuple[TrainState, int]:
    """The state to train from (restored from the newest checkpoint if any), placed on the mesh."""
    done = 0
    if self.hooks.checkpoints is not None:  # checkpoints leave frozen parameters out
      abstract, shardings = (t.replace(frozen=None) for t in (self.abstract, self.shardings))
      restored = self.hooks.checkpoints.restore_latest(abstract, shardings)
      if restored is not None:
        state, done = restored[0].replace(frozen=state.frozen), restored[1]
    if self.hooks.on_resume is not None:
      self.hooks.on_resume(done)
    # the caller's copy survives; frozen parameters are placed without a copy (never donated)
    trained = jax.device_put(
      state.replace(frozen=None), self.shardings.replace(frozen=None), may_alias=False
    )
    frozen = state.frozen
    if frozen is not None:
      frozen = jax.device_put(frozen, self.shardings.frozen, may_alias=True)
    return trained.replace(frozen=frozen), done

  def row(self, kind: str, step: int, values: dict) -> Row:
    return {
      "kind": kind,
      "stage": self.name,
      "step": step,
      "time_s": round(time.time() - self.t0, 3),
      **values,
    }

  def evaluate(self, state: TrainState, step: int) -> list[Row]:
    params = to_host(state.params)
    rows = []
    for i, ev, log in zip(self.index, self.evals, self.logs):
      row = self.row("eval", step, ev(seed_slice(params, i)))
      log(row)
      rows.append(row)
    return rows

  def eval_due(self, done: int, steps: int) -> bool:
    every = self.hooks.eval_every
    return self.evals is not None and ((every > 0 and done % every == 0) or done == steps)

  def after_chunk(self, metrics: dict, previous: int, done: int) -> dict:
    """Checks a chunk's metrics, logs one train row per seed; returns the progress-bar postfix."""
    per_seed = [
      metrics if i is None else {k: v[:, i] for k, v in metrics.items()} for i in self.index
    ]
    bad = [(b, i) for i, m in zip(self.index, per_seed) if (b := _first_bad_step(m)) is not None]
    if bad:
      self.stop_nonfinite(previous, *min(bad, key=lambda t: t[0]))
    rows = []
    for m, log in zip(per_seed, self.logs):
      rows.append(self.row("train", done, _chunk_row(m)))
      log(rows[-1])
    return {"loss": f"{_mean_of(rows, 'loss'):.3f}"}

  def stop_nonfinite(self, previous: int, bad_step: int, seed_index: int | None) -> None:
    ckpt = self.hooks.checkpoints
    if ckpt is not None:
      ckpt.wait()
    last = ckpt.steps()[-1:] if ckpt is not None else []
    raise FloatingPointError(
      f"{self.name}: non-finite loss or gradient at step {previous + bad_step + 1}"
      + ("" if seed_index is None else f" (seed index {seed_index})")
      + (f"; last good checkpoint: step {last[0]} in {ckpt.directory}" if last else "")
    )

  def save_or_stop(self, state, previous: int, done: int, steps: int, eval_rows) -> None:
    """Saves when a checkpoint is due; saves and raises Preempted when a stop was requested."""
    ckpt, guard = self.hooks.checkpoints, self.hooks.guard
    stopping = guard is not None and guard.requested and done < steps
    if ckpt is not None and (
      ckpt.due(done, previous) or done == steps or eval_rows is not None or stopping
    ):
      ckpt.save(done, state.replace(frozen=None), _mean_of(eval_rows, self.hooks.best_key))
    if stopping:
      self.finish()
      raise Preempted(self.name, done, ckpt.directory if ckpt is not None else None)

  def finish(self) -> None:
    if self.hooks.checkpoints is not None:
      self.hooks.checkpoints.wait()


def _per_seed(fns: Sequence, count: int, what: str) -> list:
  """One callable per seed; a single callable serves every seed."""
  fns = list(fns)
  if len(fns) == 1:
    fns = fns * count
  if len(fns) != count:
    raise ValueError(f"{what}: {len(fns)} callables for {count} seeds")
  return fns


def _first_bad_step(metrics: dict[str, np.ndarray]) -> int | None:
  """Index of a chunk's first update whose loss or gradient norm is not finite and was not
  skipped."""
  bad = ~(np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"]))
  if "skipped" in metrics:
    bad &= metrics["skipped"] == 0
  return int(np.argmax(bad)) if bad.any() else None


def _chunk_row(metrics: dict[str, np.ndarray]) -> dict[str, float]:
  """A chunk's per-update metrics averaged over the updates that were applied; skips counted."""
  applied = metrics["skipped"] == 0 if "skipped" in metrics else np.ones_like(metrics["loss"], bool)
  row = {}
  for k, v in metrics.items():
    if k == "skipped":
      row[k] = float(np.sum(v))
    else:
      row[k] = float(np.mean(v[applied])) if applied.any() else float("nan")
  return row
