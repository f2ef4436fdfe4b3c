"""A trained policy as a `jax.export` artifact: StableHLO that runs without iwsft.

The artifact is the deterministic policy obs [n, O] (float32) -> action [n, A] in environment
units, with the weights, the observation normalisation and the action scaling inside, and a
symbolic batch size n. Anything with jax can run it (examples/run_exported_policy.py):

  exported = jax.export.deserialize(bytearray(open("policy.jaxexport", "rb").read()))
  action = exported.call(obs[None].astype(np.float32))[0]

policy.json beside it holds the evaluation environment's gymnasium spec and the shapes.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

ARTIFACT, INFO = "policy.jaxexport", "policy.json"


def export_policy(graphdef, params, constants, directory: str, env_spec) -> str:
  """Writes <directory>/policy.jaxexport and policy.json (with the evaluation environment's
  gymnasium spec as JSON); returns the artifact's path."""
  policy = nnx.merge(graphdef, params, constants)
  obs_dim = int(policy.obs_mean[...].shape[0])
  act_dim = int(policy.act_centre[...].shape[0])
  (n,) = jax.export.symbolic_shape("n")
  exported = jax.export.export(jax.jit(policy.mode))(
    jax.ShapeDtypeStruct((n, obs_dim), jnp.float32)
  )
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, ARTIFACT)
  with open(path, "wb") as f:
    f.write(exported.serialize())
  info = {
    "env_id": env_spec.id,
    "env_spec": env_spec.to_json(),
    "obs_dim": obs_dim,
    "act_dim": act_dim,
    "input": "float32 [n, obs_dim]",
  }
  with open(os.path.join(directory, INFO), "w") as f:
    json.dump(info, f, indent=1)
  return path
