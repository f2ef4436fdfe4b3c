"""BC update throughput: steps/s of the shared update step against the machine's matmul peak,
with 1..S vmapped seeds, and against d3rlpy's BC on the same data in the same run.

  python benchmarks/bc_throughput.py                 # JAX numbers (+ d3rlpy if .venv-d3rlpy exists)
  make bench                                         # everything, installing d3rlpy's own venv

The update is the one every control run uses (iwsft.make_update + make_train_steps: batches
sampled in the graph by inverse-CDF draws, `--steps_per_dispatch` updates per jitted call, donated
state) with the BC objective on single steps (batch_level=step), a Gaussian policy and Adam; one
more row draws by Gumbel-max, as the pipeline did before. FLOPs per update are
analytic: 6 · batch · (multiply-adds of the MLP) (forward 2, backward 4); Adam's element-wise work
is left out. d3rlpy (its own virtual environment: it pins gymnasium 1.0) trains BC with a stochastic
policy of the same widths, batch and optimiser on the same transitions, written to an .npz file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iwsft  # noqa: E402
from benchmarks import common  # noqa: E402
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy  # noqa: E402
from iwsft.core.config import StageConfig, make_optimizer  # noqa: E402
from iwsft.core.objectives import ObjectiveConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D3RLPY_PYTHON = os.path.join(ROOT, ".venv-d3rlpy", "bin", "python")


def mlp_macs(obs: int, act: int, hidden) -> int:
  widths = [obs, *hidden, act]
  return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def synthetic_data(episodes: int, length: int, obs: int, act: int, seed: int = 0) -> dict:
  """Hopper-shaped episodes [N, T, ...] of a noisy linear behaviour (the values do not matter to
  speed)."""
  rng = np.random.default_rng(seed)
  o = rng.normal(size=(episodes, length, obs)).astype(np.float32)
  a = np.tanh(
    o @ rng.normal(size=(obs, act)).astype(np.float32) * 0.3
    + 0.1 * rng.normal(size=(episodes, length, act)).astype(np.float32)
  )
  return {
    "observations": o,
    "actions": a.astype(np.float32),
    "mask": np.ones((episodes, length), np.float32),
    "weight": np.ones(episodes, np.float32),
  }


def jax_steps_per_s(
  data,
  hidden,
  batch: int,
  seeds: int,
  steps_per_dispatch: int,
  repeats: int,
  inverse_cdf: bool = True,
) -> float:
  """Updates per second of each seed's run (S seeds advance together); inverse_cdf: how steps are
  drawn (step.draw_sequences; the control pipeline's way by default)."""
  obs, act = data["observations"].shape[-1], data["actions"].shape[-1]
  graphdef, _, consts = split_policy(
    GaussianPolicy(obs, act, PolicyConfig(hidden=hidden), rngs=nnx.Rngs(0))
  )
  optimizer = make_optimizer(StageConfig(steps=10**9, batch_size=batch, learning_rate=1e-3))
  update = iwsft.make_update(make_logprob_fn(graphdef, consts), optimizer, ObjectiveConfig("none"))
  states = [
    iwsft.init_state(
      split_policy(GaussianPolicy(obs, act, PolicyConfig(hidden=hidden), rngs=nnx.Rngs(s)))[1],
      optimizer,
      s,
    )
    for s in range(seeds)
  ]
  mesh = iwsft.make_mesh(1)
  state = iwsft.core.sharding.put_replicated(
    states[0] if seeds == 1 else iwsft.stack_seeds(states), mesh
  )
  pool = iwsft.core.sharding.shard_pool(data, mesh)
  logits = iwsft.core.sharding.put_replicated(np.zeros(len(data["mask"]), np.float32), mesh)
  sampling = iwsft.Sampling(steps_per_dispatch, batch, step_level=True, inverse_cdf=inverse_cdf)
  steps = iwsft.make_train_steps(update, mesh, sampling, steps_per_dispatch, vmapped=seeds > 1)
  box = [state]

  def call():
    box[0], metrics = steps(box[0], pool, logits)
    jax.block_until_ready(metrics["loss"])

  return steps_per_dispatch / common.median_seconds(call, repeats)


def breakdown(data, hidden, batch: int, steps: int, repeats: int) -> dict[str, float]:
  """Microseconds per update of the BC step's parts, each run `steps` times in one lax.scan (each
  iteration depends on the last, so nothing is hoisted out of the loop): drawing the batch, the
  policy's forward pass, forward + backward, the update on a fixed batch (+ Adam, q's copy),
  and the whole step as training runs it."""
  import jax.numpy as jnp

  obs, act = data["observations"].shape[-1], data["actions"].shape[-1]
  graphdef, params, consts = split_policy(
    GaussianPolicy(obs, act, PolicyConfig(hidden=hidden), rngs=nnx.Rngs(0))
  )
  logprob = make_logprob_fn(graphdef, consts)
  optimizer = make_optimizer(StageConfig(steps=10**9, batch_size=batch, learning_rate=1e-3))
  update = iwsft.make_update(logprob, optimizer, ObjectiveConfig("none"))
  pool = jax.tree.map(jnp.asarray, data)
  logits = jnp.zeros(len(data["mask"]))
  fixed = iwsft.core.step.sample_steps(jax.random.key(0), pool, logits, batch, True)
  loss = lambda p, b: -jnp.mean(logprob(p, b))

  def draw(key, _):
    key, sub = jax.random.split(key)
    b = iwsft.core.step.sample_steps(sub, pool, logits, batch, True)
    return jax.random.fold_in(key, b["observations"][0, 0, 0].astype(jnp.int32)), None

  def forward(c, _):
    b = {**fixed, "observations": fixed["observations"] + c * 1e-30}
    return c + jnp.sum(logprob(params, b)), None

  def backward(p, _):
    g = jax.grad(loss)(p, fixed)
    return jax.tree.map(lambda a, b: a - 1e-9 * b, p, g), None

  def fixed_update(st, _):
    return update(st, fixed)[0], None

  state = iwsft.init_state(params, optimizer, 0)
  parts = {
    "draw a batch": (draw, jax.random.key(1)),
    "forward": (forward, jnp.zeros(())),
    "forward + backward": (backward, params),
    "update on a fixed batch (+ Adam, q)": (fixed_update, state),
  }
  out = {}
  for name, (body, init) in parts.items():
    run = jax.jit(lambda c, body=body: jax.lax.scan(body, c, None, length=steps)[0])
    out[name] = (
      1e6
      * common.median_seconds(lambda r=run, c=init: jax.block_until_ready(r(c)), repeats)
      / steps
    )
  out["whole step (training)"] = 1e6 / jax_steps_per_s(data, hidden, batch, 1, steps, repeats)
  return out


def d3rlpy_steps_per_s(data, hidden, batch: int, steps: int, python: str) -> dict:
  """Runs benchmarks/d3rlpy_bc.py in d3rlpy's venv on the same transitions."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "data.npz")
    np.savez(
      path,
      observations=data["observations"].reshape(-1, data["observations"].shape[-1]),
      actions=data["actions"].reshape(-1, data["actions"].shape[-1]),
    )
    out = subprocess.run(
      [
        python,
        os.path.join(ROOT, "benchmarks", "d3rlpy_bc.py"),
        path,
        ",".join(map(str, hidden)),
        str(batch),
        str(steps),
      ],
      capture_output=True,
      text=True,
      timeout=3600,
    )
    if out.returncode != 0:
      raise RuntimeError(f"d3rlpy benchmark failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--hidden", default="256,256", help="policy widths (d3rlpy's comparison used 256,256)"
  )
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--seeds", default="1,2,5,10", help="vmapped seed counts to measure")
  p.add_argument("--steps_per_dispatch", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5, help="timed dispatches (median)")
  p.add_argument(
    "--d3rlpy",
    choices=["auto", "yes", "no"],
    default="auto",
    help="compare with d3rlpy (auto: if .venv-d3rlpy exists)",
  )
  p.add_argument("--d3rlpy_steps", type=int, default=2000)
  p.add_argument("--breakdown", choices=["yes", "no"], default="yes", help="time the step's parts")
  return p.parse_args()


def main():
  args = _args()
  hidden = tuple(int(x) for x in args.hidden.split(","))
  data = synthetic_data(100, 1000, 11, 3)
  flops = 6 * args.batch * mlp_macs(11, 3, hidden)
  peak = common.matmul_peak()
  peak_small = common.matmul_peak(n=max(hidden))  # a matmul of the policy's own width: its ceiling
  width = f"% of {max(hidden)}² matmul"

  def row(impl: str, seeds: int, sps: float) -> dict:
    return {
      "impl": impl,
      "seeds": seeds,
      "steps/s per seed": sps,
      "updates/s (all seeds)": sps * seeds,
      "GFLOP/s": sps * seeds * flops / 1e9,
      "% of matmul peak": 100 * sps * seeds * flops / peak,
      width: 100 * sps * seeds * flops / peak_small,
    }

  rows = [
    row(
      "iwsft (JAX)",
      s,
      jax_steps_per_s(data, hidden, args.batch, s, args.steps_per_dispatch, args.repeats),
    )
    for s in (int(x) for x in args.seeds.split(","))
  ]
  gumbel = jax_steps_per_s(
    data, hidden, args.batch, 1, args.steps_per_dispatch, args.repeats, inverse_cdf=False
  )
  rows.append(row("iwsft (JAX), Gumbel-max draws (before)", 1, gumbel))
  use_d3 = args.d3rlpy == "yes" or (args.d3rlpy == "auto" and os.path.exists(D3RLPY_PYTHON))
  d3 = None
  if use_d3:
    d3 = d3rlpy_steps_per_s(data, hidden, args.batch, args.d3rlpy_steps, D3RLPY_PYTHON)
    rows.append(row(f"d3rlpy {d3['version']} (torch {d3['torch']})", 1, d3["steps_per_s"]))
  print(
    f"BC update, Gaussian policy {args.hidden}, batch {args.batch}, Adam; {flops / 1e6:.1f} "
    f"MFLOP per "
    f"update; matmul peak {peak / 1e9:.1f} GFLOP/s (2048²), {peak_small / 1e9:.1f} GFLOP/s "
    f"({max(hidden)}²) on {common.machine()['device']}"
  )
  print(common.table(rows, list(rows[0])))
  if d3 is not None:
    print(f"iwsft / d3rlpy (1 seed): {rows[0]['steps/s per seed'] / d3['steps_per_s']:.1f}x")
  parts = None
  if args.breakdown == "yes":
    parts = breakdown(data, hidden, args.batch, args.steps_per_dispatch, args.repeats)
    floor = 1e6 * flops / peak_small
    print(
      f"Where one update's time goes (µs; its FLOPs at the {max(hidden)}² matmul rate take "
      f"{floor:.0f}):"
    )
    print(
      common.table(
        [{"part": k, "µs per update": v} for k, v in parts.items()], ["part", "µs per update"]
      )
    )
  path = common.save(
    "bc_throughput",
    {
      "hidden": hidden,
      "batch": args.batch,
      "flops_per_update": flops,
      "matmul_peak_flops": peak,
      "matmul_width_flops": peak_small,
      "rows": rows,
      "d3rlpy": d3,
      "breakdown_us": parts,
    },
  )
  print(f"-> {path}")


if __name__ == "__main__":
  main()
