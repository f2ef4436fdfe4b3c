"""Saving and restoring with orbax: the one place for the on-disk formats.

Two kinds of checkpoint:
  save_state/restore_state  a finished model (NNX state as a pure nested dict of arrays), so it
  never
                            depends on Python class names.
  TrainCheckpoints          periodic, asynchronous checkpoints of a whole `train.TrainState` during
  a
                            stage (orbax CheckpointManager): the last K steps plus the best
                            evaluated
                            one. Resuming from them continues bit-identically on the same device
                            count,
                            and reshards onto any other.

A TrainState checkpoint holds its leaves under indices ("0", "1", ...) plus a JSON layout of their
tree paths, shapes and dtypes, so a checkpoint of another model is named as such before any array
is read, and a partial or corrupt step is skipped with a warning rather than ending the run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from iwsft.errors import UserError

_policies = ocp.checkpoint_managers


def save_state(path: str, state: nnx.State) -> None:
  """Writes an NNX state (e.g. policy params) to directory `path` (replacing it).

  A collective: every process of a multi-process run calls it. Host arrays (the same in every
  process) are written once; arrays split over the mesh are written by each process from its
  own shards, never gathered.
  """
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), jax.tree.map(_savable, nnx.to_pure_dict(state)), force=True)
  ckptr.wait_until_finished()


def _savable(x):
  """A global jax array as it is (orbax writes each shard from the process holding it); a
  process-local one of a multi-process run, and any host value, as numpy (the same in every
  process)."""
  if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
    return x
  return np.asarray(x)


def restore_state(path: str, template: nnx.State) -> nnx.State:
  """Reads `path` into the structure, shapes and dtypes of `template`; a UserError if they
  differ. A template leaf spread over several devices is restored in its sharding (each process
  reading its own shards); any other leaf as a host (numpy) array."""
  ckptr = ocp.StandardCheckpointer()
  target = nnx.to_pure_dict(template)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  spread = lambda x: isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=x.sharding if spread(x) else local
    ),
    target,
  )
  try:
    restored = ckptr.restore(os.path.abspath(path), abstract)
  except Exception as e:
    raise UserError(
      f"checkpoint {path} does not match this model: {type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}"
    ) from None
  restored = jax.tree.map(lambda r, x: r if spread(x) else np.asarray(r), restored, target)
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, restored)
  return state


def layout(tree) -> list[list]:
  """[[tree path, shape, dtype], ...] of a pytree's leaves, in flattening order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [[jax.tree_util.keystr(p), list(x.shape), str(np.dtype(x.dtype))] for p, x in leaves]


def check_checkpoint_settings(every: int, keep: int) -> None:
  if every < 1 or keep < 1:
    raise UserError(f"checkpoint_every and keep_checkpoints must be >= 1, got {every} and {keep}")


class TrainCheckpoints:
  """Periodic checkpoints of one training stage's TrainState in `directory` (one subdirectory per
  step).

  every: save every this many updates (at the end of the dispatch that reaches a multiple);
  keep: how many of the latest steps to keep; the best step by the `metric` passed to save() is
  kept too.
  """

  def __init__(self, directory: str, every: int, keep: int = 2, async_save: bool = True):
    check_checkpoint_settings(every, keep)
    self.directory, self.every = os.path.abspath(directory), every
    policy = _policies.AnyPreservationPolicy(
      [
        _policies.LatestN(keep),
        _policies.BestN(
          get_metric_fn=lambda m: m["metric"], n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      create=True,
      cleanup_tmp_directories=True,
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
    )
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f"cannot create checkpoints in {self.directory}: {e.strerror}") from None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def due(self, done: int, previous: int) -> bool:
    """Whether a dispatch that went from `previous` to `done` updates crossed a multiple of
    every."""
    return done // self.every > previous // self.every

  def save(self, step: int, state, metric: float | None = None) -> None:
    """Starts an asynchronous save of `state` at `step` (arrays are copied off the devices
    first)."""
    items = {
      "state": ocp.args.StandardSave({str(i): x for i, x in enumerate(jax.tree.leaves(state))}),
      "layout": ocp.args.JsonSave({"leaves": layout(state)}),
    }
    metrics = None if metric is None or not np.isfinite(metric) else {"metric": float(metric)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore_latest(self, template, sharding) -> tuple[Any, int] | None:
    """The newest readable checkpoint as (state, step), its arrays placed with `sharding` (one
    sharding for every leaf, or a pytree of them shaped like template); None if none.

    template: a TrainState (or its jax.eval_shape) of the model being trained. A checkpoint of
    another
    model raises UserError; an unreadable step is skipped with a warning and the one before is
    tried.
    """
    want = layout(template)
    shardings = jax.tree.leaves(sharding)  # a single sharding is one leaf
    shardings = shardings * len(want) if len(shardings) == 1 else shardings
    for step, saved in _readable_layouts(self.manager, self.directory, warn=True):
      _check_layout(saved, want, self.directory, step)
      abstract = {
        str(i): jax.ShapeDtypeStruct(tuple(s), np.dtype(d), sharding=sh)
        for i, ((_, s, d), sh) in enumerate(zip(want, shardings))
      }
      try:
        arrays = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
      except Exception as e:  # noqa: BLE001
        _warn_skip(self.directory, step, e)
        continue
      leaves = [arrays.state[str(i)] for i in range(len(want))]
      return jax.tree.unflatten(jax.tree.structure(template), leaves), step
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_resumable(directory: str, template) -> None:
  """Raises UserError if `directory` holds checkpoints of a different model than `template`.

  Reads only the newest readable step's layout and writes nothing, so a run can refuse to resume
  before it touches its workdir.
  """
  if not os.path.isdir(directory):
    return
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
  try:
    for step, saved in _readable_layouts(manager, directory, warn=False):
      _check_layout(saved, layout(template), directory, step)
      return
  finally:
    manager.close()


def _readable_layouts(manager, directory: str, warn: bool):
  """(step, saved layout) of each readable step, newest first; a damaged one is skipped (warned if
  warn)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved = manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged step
      if warn:
        _warn_skip(directory, step, e)
      continue
    yield step, saved.layout["leaves"]


def _warn_skip(directory: str, step: int, error: Exception) -> None:
  first = str(error).splitlines()[0] if str(error) else ""
  warnings.warn(
    f"skipping unreadable checkpoint {directory}/{step}: {type(error).__name__}: {first}",
    stacklevel=3,
  )


def _check_layout(saved: list, want: list, directory: str, step: int) -> None:
  if len(saved) != len(want):
    raise UserError(
      f"checkpoint {directory}/{step} holds {len(saved)} arrays, this model has "
      f"{len(want)}: it is from another model; use another --workdir or --overwrite"
    )
  for (path, shape, dtype), (_, w_shape, w_dtype) in zip(saved, want):
    if list(shape) != list(w_shape) or dtype != w_dtype:
      raise UserError(
        f"checkpoint {directory}/{step} is from another model: {path} is {dtype}{shape}, "
        f"this model needs {w_dtype}{w_shape}; use another --workdir or --overwrite"
      )
