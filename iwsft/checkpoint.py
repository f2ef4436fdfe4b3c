"""Saving and restoring parameter pytrees with orbax (one place for the on-disk format).

Flax NNX states are stored as pure nested dicts of arrays and put back into a template state, so
a checkpoint never depends on Python class names.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from iwsft.errors import UserError


def save_state(path: str, state: nnx.State) -> None:
  """Writes an NNX state (e.g. policy params) to directory `path` (replacing it)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), nnx.to_pure_dict(state), force=True)
  ckptr.wait_until_finished()


def restore_state(path: str, template: nnx.State) -> nnx.State:
  """Reads `path` into the structure, shapes and dtypes of `template`; a UserError if they differ."""
  ckptr = ocp.StandardCheckpointer()
  target = nnx.to_pure_dict(template)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
  try:
    restored = ckptr.restore(os.path.abspath(path), abstract)
  except Exception as e:
    raise UserError(f"checkpoint {path} does not match this model: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, restored)
  return state
