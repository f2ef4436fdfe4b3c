"""Offline RL peers (d3rlpy): the transitions they train on, read back against Minari's episodes,
their exported actor's forward pass against a hand computation, and offline_rl.py's whole run with
d3rlpy's side stood in for."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXPERT

from iwsft.control import data as data_lib
from iwsft.control import peers
from iwsft.errors import UserError
from iwsft.io import report
from iwsft.sweep import CELL_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = "iwsft/hopper-small/medium-v1"


def test_transitions_are_minaris_steps_with_episode_ends():
  dataset = data_lib.load_dataset(SHIPPED)  # installed from the package's copy
  got = peers.transitions(dataset)
  episodes = list(dataset.iterate_episodes())
  np.testing.assert_array_equal(
    got["observations"], np.concatenate([e.observations[:-1] for e in episodes]).astype(np.float32)
  )
  np.testing.assert_array_equal(
    got["actions"], np.concatenate([e.actions for e in episodes]).astype(np.float32)
  )
  np.testing.assert_allclose(got["rewards"], np.concatenate([e.rewards for e in episodes]))
  ends = np.cumsum([len(e.actions) for e in episodes]) - 1
  terminated = np.array([e.terminations[-1] for e in episodes], bool)
  assert terminated.any() and len(got["rewards"]) == dataset.total_steps
  np.testing.assert_array_equal(np.flatnonzero(got["terminals"]), ends[terminated])
  np.testing.assert_array_equal(np.flatnonzero(got["timeouts"]), ends[~terminated])


def test_datasets_whose_actions_leave_minus_one_to_one_are_refused(datasets):
  with pytest.raises(UserError, match=r"\[-1, 1\]"):
    peers.transitions(data_lib.load_dataset(EXPERT))  # InvertedPendulum: actions in [-3, 3]


def _actor(check_offset=0.0):
  """obs [N, 1] -> tanh(w1 · relu(w0 · (obs − 1) / 2 + b0) + b1), with its own check sample."""
  arrays = {
    "w0": np.array([[1.0, -1.0]], np.float32),
    "b0": np.array([0.0, 0.5], np.float32),
    "w1": np.array([[2.0], [1.0]], np.float32),
    "b1": np.array([-0.5], np.float32),
    "obs_mean": np.array([1.0], np.float32),
    "obs_scale": np.array([2.0], np.float32),
  }
  obs = np.array([[3.0], [-1.0]], np.float32)
  # by hand: obs 3 -> x 1 -> h [1, 0] -> tanh(1.5); obs -1 -> x -1 -> h [0, 1.5] -> tanh(1.0)
  want = np.tanh(np.array([[1.5], [1.0]]))
  arrays.update(check_observations=obs, check_actions=(want + check_offset).astype(np.float32))
  return arrays, obs, want


def test_actor_forward_against_a_hand_computation(tmp_path):
  arrays, obs, want = _actor()
  np.testing.assert_allclose(peers.actor_forward(arrays, obs), want, rtol=1e-7)
  np.savez(tmp_path / "actor.npz", **arrays)
  act = peers.read_actor(str(tmp_path / "actor.npz"))
  np.testing.assert_allclose(act(obs), want, rtol=1e-6)


def test_an_actor_that_does_not_reproduce_the_peers_predictions_is_refused(tmp_path):
  arrays, _, _ = _actor(check_offset=0.01)
  np.savez(tmp_path / "actor.npz", **arrays)
  with pytest.raises(UserError, match="differs from the peer's"):
    peers.read_actor(str(tmp_path / "actor.npz"))


D3RLPY = os.path.join(ROOT, ".venv-d3rlpy", "bin", "python")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(D3RLPY), reason="needs `make .venv-d3rlpy/.installed`")
@pytest.mark.parametrize("algo", ["iql", "td3_bc", "bc"])
def test_d3rlpys_actor_is_reproduced_and_evaluated(tmp_path, algo):
  """A short d3rlpy run on the shipped data: its actor file passes read_actor's check against
  d3rlpy's own predict, and acts in the dataset's environment."""
  from iwsft.control.evaluate import evaluate
  from iwsft.control.pipeline import environment

  dataset = data_lib.load_dataset(SHIPPED)
  peers.write_transitions(dataset, str(tmp_path / "data.npz"))
  script = os.path.join(ROOT, "experiments", "d3rlpy_offline.py")
  args = [D3RLPY, script, str(tmp_path / "data.npz"), algo, "0", "20", "10,20", str(tmp_path)]
  subprocess.run(args, check=True, capture_output=True)
  act = peers.read_actor(str(tmp_path / "actor_20.npz"), atol=1e-5)
  env_spec, _ = environment(dataset, SHIPPED)
  ev = evaluate(act, env_spec, 2, 0, *data_lib.reference_scores(dataset))
  assert ev["episodes"] == 2 and np.isfinite(ev["normalised_score"])


def _finished_peer_run(workdir, dataset, method, algo, seed, score):
  """A result.json as offline_rl.py's do_run writes it, with made-up scores."""
  import json

  out = os.path.join(workdir, dataset.replace("/", "__"), algo, f"seed_{seed}")
  os.makedirs(out)
  snaps = [
    {"step": s, "wall_time_s": s / 100, "return_mean": score, "normalised_score": score * s / 10}
    for s in (1, 10)
  ]
  rec = {
    "snapshots": snaps, "dataset": dataset, "method": method, "seed": seed, "score": score,
    "return_mean": score, "wall_time_s": 0.1, "seeds_trained_together": 1,
    "cell": os.path.relpath(out, workdir),
  }  # fmt: skip
  with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(rec, f)


@pytest.mark.parametrize("n_datasets", [1, 2])
def test_offline_rl_tables_of_finished_runs_against_scipy(tmp_path, n_datasets):
  """--tables_only over finished peer runs and a sweep's cells.csv: each iwsft method minus each
  peer paired by seed, with the Student-t interval computed here by scipy; aggregate.csv only
  with two datasets; no paired heading when there is nothing to pair."""
  import csv
  import json

  from scipy import stats

  rng = np.random.default_rng(0)
  datasets = [f"iwsft/test/d{i}-v0" for i in range(n_datasets)]
  seeds = [0, 1, 2, 3]
  work = tmp_path / "peers"
  work.mkdir()
  (work / "settings.json").write_text(
    json.dumps({"steps": 10, "snapshots": [1, 10], "eval_episodes": 20})
  )
  score = {}
  for d in datasets:
    for s in seeds:
      for algo, method in (("iql", "iql"), ("td3_bc", "td3_bc")):
        score[d, method, s] = float(rng.normal(30, 5))
        _finished_peer_run(str(work), d, method, algo, s, score[d, method, s])
      for method in ("bc", "iw_sft"):
        score[d, method, s] = float(rng.normal(25, 5))
  cells = tmp_path / "cells.csv"  # as a sweep writes it
  ours = [
    {"dataset": d, "method": m, "seed": s, "score": v, "cell": f"{m}/seed_{s}"}
    for (d, m, s), v in score.items()
    if m in ("bc", "iw_sft")
  ]
  report.write_csv(str(cells), ours, CELL_COLUMNS)

  def tables(*extra):
    args = [
      "--tables_only",
      f"--workdir={work}",
      f"--datasets={','.join(datasets)}",
      "--algos=iql,td3_bc",
    ]
    args += ["--seeds=0,1,2,3", "--steps=10", "--snapshots=1", *extra]
    r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "offline_rl.py"), *args],
      capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout

  assert "Seed-paired" not in tables()  # the peers alone: nothing to pair
  out = tables(f"--compare={cells}")
  assert "Seed-paired" in out
  with open(work / "paired.csv") as f:
    rows = {(r["dataset"], r["method"], r["baseline"]): r for r in csv.DictReader(f)}
  t = stats.t.ppf(0.975, len(seeds) - 1)
  for d in datasets:
    for m in ("bc", "iw_sft"):
      for peer in ("iql", "td3_bc"):
        x = np.array([score[d, m, s] - score[d, peer, s] for s in seeds])
        half = t * x.std(ddof=1) / np.sqrt(len(x))
        r = rows[d, m, peer]
        np.testing.assert_allclose(float(r["mean"]), x.mean(), rtol=1e-9)
        np.testing.assert_allclose(
          [float(r["ci_low"]), float(r["ci_high"])], [x.mean() - half, x.mean() + half], rtol=1e-9
        )
  assert (work / "aggregate.csv").exists() == (n_datasets > 1)


FAKE_D3RLPY = """#!{python}
import json, os, sys
import numpy as np
script, data, algo, seed, steps, snaps, out = sys.argv[1:8]
with np.load(data) as f:
  obs, actions = f["observations"], f["actions"]
os.makedirs(out, exist_ok=True)
np.save(os.path.join(out, "..", "argv.npy"), np.array(sys.argv[1:8]))
b1 = np.full(actions.shape[1], {bias}, np.float32)
for step in snaps.split(","):
  np.savez(
    os.path.join(out, f"actor_{{step}}.npz"), w0=np.zeros((obs.shape[1], 4), np.float32),
    b0=np.zeros(4, np.float32), w1=np.zeros((4, actions.shape[1]), np.float32), b1=b1,
    obs_mean=np.zeros(obs.shape[1], np.float32), obs_scale=np.ones(obs.shape[1], np.float32),
    check_observations=obs[:8], check_actions=np.tile(np.tanh(b1), (8, 1)),
  )
walls = {{s: 0.5 for s in snaps.split(",")}}
print(json.dumps({{"wall_time_s": walls, "d3rlpy": "fake", "torch": "none"}}))
"""


def test_a_peer_run_end_to_end_with_d3rlpy_stood_in_for(tmp_path):
  """offline_rl.py's whole run, d3rlpy's side replaced by a script that exports a constant actor
  (action tanh(0.1) everywhere): it is handed the dataset's transitions, its actor is evaluated
  over the final-evaluation episodes (checked here by rolling them out in gymnasium directly), and
  result.json records the score, the snapshots and the code that made it."""
  import json

  from iwsft.control.stages import FINAL_EVAL_SEED
  from iwsft.io.workdir import code_version

  fake = tmp_path / "python"
  fake.write_text(FAKE_D3RLPY.format(python=sys.executable, bias=0.1))
  fake.chmod(0o755)
  work = tmp_path / "peers"
  args = [f"--python={fake}", f"--workdir={work}", f"--datasets={SHIPPED}", "--algos=td3_bc"]
  args += ["--seeds=3", "--steps=2", "--snapshots=1", "--eval_episodes=2"]
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "offline_rl.py"), *args],
    capture_output=True, text=True, cwd=ROOT,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr
  run = work / SHIPPED.replace("/", "__") / "td3_bc" / "seed_3"
  rec = json.loads((run / "result.json").read_text())
  dataset = data_lib.load_dataset(SHIPPED)

  handed = np.load(run.parent / "argv.npy")
  assert handed[0] == os.path.join(ROOT, "experiments", "d3rlpy_offline.py")
  assert list(handed[2:7]) == ["td3_bc", "3", "2", "1,2", str(run)]
  with np.load(handed[1]) as f:
    for k, v in peers.transitions(dataset).items():
      np.testing.assert_array_equal(f[k], v)

  env = dataset.recover_environment(eval_env=True)
  returns = []
  for i in range(2):
    env.reset(seed=3 + FINAL_EVAL_SEED + i)
    total, done = 0.0, False
    while not done:
      _, reward, terminated, truncated, _ = env.step(np.full(env.action_space.shape, np.tanh(0.1)))
      total, done = total + reward, terminated or truncated
    returns.append(total)
  lo, hi = data_lib.reference_scores(dataset)
  want = 100 * (np.mean(returns) - lo) / (hi - lo)
  assert [s["step"] for s in rec["snapshots"]] == [1, 2]
  np.testing.assert_allclose(rec["return_mean"], np.mean(returns), rtol=1e-5)
  np.testing.assert_allclose(rec["score"], want, rtol=1e-5)
  assert rec["method"] == "td3_bc" and rec["seed"] == 3 and rec["d3rlpy"] == "fake"
  assert rec["code"] == code_version()
  assert (work / "table.csv").exists()
