"""Control pipeline end to end: data loading, filtering, the CLI, and bad input."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import (
  DISCRETE,
  EMPTY,
  EXPERT,
  HORIZON,
  MIXED,
  NAN,
  WRONG_ACTION,
  code_of_checkout,
  control_flags,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "experiments", "control.py")
TINY = control_flags(
  reference__steps=200,
  eval__every=0,
  eval__episodes=3,
  eval__final_episodes=5,
  steps_per_dispatch=20,
  checkpoint_every=None,
  policy__normalise_observations="true",  # the tests below check the statistics
)
DS = "--config.dataset="
NO_PERCENTILES = "--config.curation.percentiles=()"


def cli(*args):
  return subprocess.run(
    [sys.executable, CLI, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ),
    timeout=600,
  )


def test_episodes_read_back_exactly(datasets):
  import minari

  from iwsft.control.data import episodes_from_minari, load_dataset

  ds = load_dataset(MIXED)
  eps = episodes_from_minari(ds)
  assert eps.num_episodes == 40
  raw = list(minari.load_dataset(MIXED).iterate_episodes())
  for i in (0, 17, 39):
    k = len(raw[i].actions)
    assert eps.lengths[i] == k and eps.mask[i].sum() == k and not eps.mask[i, k:].any()
    np.testing.assert_allclose(eps.observations[i, :k], raw[i].observations[:k], rtol=1e-6)
    np.testing.assert_allclose(eps.actions[i, :k], raw[i].actions, rtol=1e-6)
    np.testing.assert_allclose(eps.returns[i], raw[i].rewards.sum())
  assert eps.num_steps == ds.total_steps


def test_filtered_bc_keeps_exactly_the_competent_episodes(datasets):
  from iwsft.control.config import get_config
  from iwsft.control.data import episodes_from_minari, load_dataset
  from iwsft.control.settings import curation_for, validate

  eps = episodes_from_minari(load_dataset(MIXED))
  competent = np.zeros(40, bool)
  competent[15:25] = True  # recording order: 15 biased, 10 competent, 15 biased
  assert eps.returns[competent].min() == HORIZON > eps.returns[~competent].max()
  cfg = get_config()
  cfg.curation.percentiles = ()
  cfg.curation.top_fraction = 0.25
  logits, _ = curation_for("filtered_bc", eps.returns, validate(cfg).curation)
  np.testing.assert_array_equal(np.isfinite(logits), competent)


def test_bc_continued_trains_on_every_episode_with_the_finetuning_stage(datasets):
  """The control for "more training": no curation (uniform over all episodes), the fine-tuning
  stage's settings, unweighted."""
  from iwsft.control.config import get_config
  from iwsft.control.data import episodes_from_minari, load_dataset
  from iwsft.control.settings import curation_for, validate

  eps = episodes_from_minari(load_dataset(MIXED))
  cfg = get_config()
  cfg.method = "bc_continued"
  s = validate(cfg)
  logits, weight = curation_for("bc_continued", eps.returns, s.curation)
  np.testing.assert_array_equal(logits, np.zeros(40))
  np.testing.assert_array_equal(weight, np.ones(40))
  assert s.finetune is not None and s.finetune.steps == cfg.finetune.steps
  assert s.objective.importance_weighting == "none"


def test_cli_writes_a_valid_result(datasets, tmp_path):
  work = tmp_path / "run"
  r = cli(
    DS + MIXED,
    "--config.method=iw_sft",
    NO_PERCENTILES,
    "--config.curation.top_fraction=0.25",
    f"--workdir={work}",
    *TINY,
    "--config.eval.every=20",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  # stderr is not a terminal here: no progress bar, one summary line per evaluation
  assert "\r" not in r.stderr
  notes = [line for line in r.stderr.splitlines() if line.startswith("iw_sft ")]
  assert [n.split(":")[0] for n in notes] == ["iw_sft 20/40", "iw_sft 40/40"], r.stderr
  assert all("normalised_score" in n for n in notes)
  result = json.loads((work / "result.json").read_text())
  assert result["method"] == "iw_sft" and result["dataset"] == MIXED and result["seed"] == 0
  assert result["curated_episodes"] == 10 and result["eval_episodes"] == 5
  assert 0 <= result["return_mean"] <= HORIZON
  np.testing.assert_allclose(
    result["normalised_score"], 100 * (result["return_mean"] - 5) / (HORIZON - 5), rtol=1e-6
  )
  assert result["config"]["finetune"]["steps"] == 40 and result["wall_time_s"] > 0
  assert result["code"].startswith(code_of_checkout())  # the commit that made it
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == "iw_sft"]
  assert [r["step"] for r in train_rows] == [20, 40]
  for r in train_rows:
    assert np.isfinite(r["loss"]) and 0 < r["iw/ess_fraction"] <= 1 and "bound/iw_sft" in r
  assert rows[-1]["stage"] == "final"
  assert (work / "curve.png").stat().st_size > 10_000
  assert (work / "reference" / "reference.json").exists()
  from iwsft.control.data import episodes_from_minari, load_dataset
  from iwsft.control.policy import PolicyConfig, load_policy

  policy = load_policy(str(work / "policy"), 4, 1, PolicyConfig(hidden=(32, 32)))
  eps = episodes_from_minari(load_dataset(MIXED))
  real = eps.observations[eps.mask.astype(bool)].astype(np.float64)  # every real step
  np.testing.assert_allclose(np.asarray(policy.obs_mean[...]), real.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(policy.obs_std[...]), np.maximum(real.std(axis=0), 1e-3), rtol=1e-5
  )
  np.testing.assert_allclose(np.asarray(policy.act_scale[...]), [3.0])
  top = np.argsort(-eps.returns, kind="stable")[:10]  # top_fraction 0.25 of 40 episodes
  _check_final_log_ratio(work, result, eps, top)  # equal returns: no correlation (None)


def _np_loglik(params, consts, obs, act):
  """Per-step log N(act; centre + scale · tanh(MLP(normalised obs)), (scale · σ)²) in float64."""
  v = lambda x: np.asarray(x["value"] if isinstance(x, dict) else x, np.float64)
  layers = [params["hidden"][k] for k in sorted(params["hidden"], key=int)] + [params["mean_head"]]
  x = (obs - v(consts["obs_mean"])) / v(consts["obs_std"])
  for i, layer in enumerate(layers):
    x = x @ v(layer["kernel"]) + v(layer["bias"])
    x = np.maximum(x, 0) if i < len(layers) - 1 else np.tanh(x)
  mean = v(consts["act_centre"]) + v(consts["act_scale"]) * x
  std = v(consts["act_scale"]) * np.exp(np.clip(v(params["log_std"]), -5.0, 2.0))
  z = (act - mean) / std
  return np.sum(-0.5 * z**2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=-1)


def _check_final_log_ratio(work, result, eps, curated):
  """result.json's final_log_ratio: the Spearman correlation of the curated episodes' mean
  log θ/π_ref with their returns, recomputed in numpy and scipy from the saved weights."""
  import orbax.checkpoint as ocp
  from scipy import stats

  ckpt = ocp.StandardCheckpointer()
  consts = ckpt.restore(work / "policy" / "constants")
  theta, ref = (ckpt.restore(work / d / "params") for d in ("policy", "reference"))
  ratio = []
  for i in curated:
    n = int(eps.mask[i].sum())
    obs, act = eps.observations[i, :n].astype(np.float64), eps.actions[i, :n].astype(np.float64)
    ratio.append(np.mean(_np_loglik(theta, consts, obs, act) - _np_loglik(ref, consts, obs, act)))
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)  # equal returns: nan, expected
    want = stats.spearmanr(ratio, eps.returns[curated]).statistic
  final = result["final_log_ratio"]
  assert final["episodes"] == len(curated)
  if np.isnan(want):  # a constant input: undefined, recorded as null
    assert final["spearman_log_ratio_return"] is None
  else:
    np.testing.assert_allclose(final["spearman_log_ratio_return"], want, atol=1e-9)
  np.testing.assert_allclose(final["mean_log_ratio"], np.mean(ratio), rtol=1e-4, atol=1e-5)


def test_observations_are_not_normalised_when_switched_off(datasets, tmp_path):
  """The paper preset's default, as the authors' control code: the policy stores mean 0, std 1."""
  from iwsft.control.config import get_config
  from iwsft.control.pipeline import prepare, validate

  cfg = get_config()
  assert not cfg.policy.normalise_observations and get_config("cpu").policy.normalise_observations
  cfg.update(dataset=MIXED, num_devices=1)
  cfg.reference.batch_size = 8
  cfg.finetune.batch_size = 8
  run = prepare(validate(cfg), [0], quiet=True)
  assert np.all(np.asarray(run.policies.constants["obs_mean"][...]) == 0)
  assert np.all(np.asarray(run.policies.constants["obs_std"][...]) == 1)


@pytest.mark.parametrize(
  "method,extra",
  [
    ("iw_sft_q", "--config.curation.quality_mode=weight"),
    ("sft_q", "--config.objective.importance_weighting=step"),
  ],
)
def test_quality_methods_run(datasets, tmp_path, method, extra):
  work = tmp_path / method
  r = cli(DS + MIXED, f"--config.method={method}", extra, f"--workdir={work}", *TINY)
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads((work / "result.json").read_text())
  assert result["method"] == method and np.isfinite(result["return_mean"])
  if method == "sft_q":
    assert result["final_log_ratio"]["spearman_log_ratio_return"] is None
    assert np.isfinite(result["final_log_ratio"]["mean_log_ratio"])
  else:  # every episode is curated, with returns of every size
    from iwsft.control.data import episodes_from_minari, load_dataset

    eps = episodes_from_minari(load_dataset(MIXED))
    _check_final_log_ratio(work, result, eps, np.arange(40))
    assert abs(result["final_log_ratio"]["spearman_log_ratio_return"]) > 0


def test_validation_split_is_held_out_and_scored(datasets, tmp_path):
  """--val_fraction holds episodes out of training (the pool and the normalisation) and logs their
  NLL."""
  import minari

  from iwsft.control.data import episodes_from_minari, split_indices
  from iwsft.control.policy import PolicyConfig, load_policy

  work = tmp_path / "val"
  r = cli(
    DS + MIXED,
    "--config.method=bc",
    "--config.val_fraction=0.25",
    "--config.eval.every=100",
    f"--workdir={work}",
    *[a for a in TINY if not a.startswith("--config.eval.every")],
  )
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  val = [row["val_nll"] for row in rows if "val_nll" in row]
  assert len(val) >= 2 and all(np.isfinite(val)) and val[-1] < val[0]
  n = minari.load_dataset(MIXED).total_episodes
  train_idx, val_idx = split_indices(n, 0.25, seed=0)
  assert len(val_idx) == round(0.25 * n) and not set(train_idx) & set(val_idx)
  eps = episodes_from_minari(minari.load_dataset(MIXED), train_idx)
  mean = (
    eps.observations[eps.mask.astype(bool)].astype(np.float64).mean(axis=0)
  )  # training steps only
  policy = load_policy(str(work / "policy"), 4, 1, PolicyConfig(hidden=(32, 32)))
  np.testing.assert_allclose(np.asarray(policy.obs_mean[...]), mean, rtol=1e-5)


def test_bc_on_competent_data_beats_a_random_policy(datasets, tmp_path):
  import gymnasium as gym

  from iwsft.control.config import get_config
  from iwsft.control.evaluate import run_episodes
  from iwsft.control.pipeline import run_control

  cfg = get_config()
  cfg.update(dataset=EXPERT, method="bc", steps_per_dispatch=100)
  cfg.policy.hidden = (64, 64)
  cfg.eval.update(every=0, episodes=5, final_episodes=10)
  cfg.reference.update(steps=600, batch_size=8)
  result = run_control(cfg, str(tmp_path / "bc"), quiet=True)
  spec = dataclasses.replace(gym.spec("InvertedPendulum-v5"), max_episode_steps=HORIZON)
  space = gym.make(spec).action_space
  rng = np.random.default_rng(0)
  random_returns = run_episodes(
    lambda o: rng.uniform(space.low, space.high, (len(o), 1)), spec, 10, seed=0
  )
  assert random_returns.mean() < 20
  assert result["return_mean"] >= 0.9 * HORIZON > 3 * random_returns.mean()


BAD = [
  ([DS + "iwsft/nowhere/none-v0"], "not in"),
  ([DS + NAN], "NaN"),
  ([DS + WRONG_ACTION], "actions have 2 dims"),
  ([DS + EMPTY], "no episodes"),
  ([DS + MIXED, "--config.curation.top_fraction=0", NO_PERCENTILES], "top_fraction"),
  ([DS + MIXED, "--config.curation.top_fraction=1.5", NO_PERCENTILES], "top_fraction"),
  ([DS + MIXED, "--config.method=ppo"], "method"),
  ([DS + MIXED, "--config.stepz=3"], "stepz"),
  ([DS + MIXED, "--config.finetune.batch_size=0"], "batch_size"),
  ([DS + MIXED, "--config.policy.hidden=a,b"], "hidden"),
  ([DS + MIXED, "--config.objective.q_decay=1.5"], "q_decay"),
  ([DS + MIXED, "--config=iwsft/control/config.py:gpu"], "unknown control preset"),
  ([DS + DISCRETE], "only continuous (Box) action spaces"),
  ([DS + MIXED, "--workdir=/proc/iwsft-run"], "cannot write to workdir /proc/iwsft-run"),
  ([DS + MIXED, "--config.checkpoint_every=0"], "checkpoint_every"),
  ([DS + MIXED, "--config.micro_batches=3", "--config.pack_batches=false"], "must divide"),
  ([DS + MIXED, "--config.micro_batches=2"], "pack_batches=False"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_leaves_workdir_alone(datasets, tmp_path, args, needle):
  work = tmp_path / "work"
  work.mkdir()
  (work / "metrics.jsonl").write_text("keep me\n")
  r = cli(f"--workdir={work}", *TINY, *args)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
  assert len(lines) == 1 and needle in lines[0], r.stderr
  assert "Traceback" not in r.stderr
  assert sorted(os.listdir(work)) == ["metrics.jsonl"]
  assert (work / "metrics.jsonl").read_text() == "keep me\n"


@pytest.mark.slow  # the core test_micro_batches_give_the_update_of_the_whole_batch runs by default
def test_micro_batches_train_the_policy_of_whole_batches(datasets, tmp_path):
  """The CLI's iw-SFT with every batch in 4 micro-batches ends in the policy and score of whole
  batches (the same updates, up to float32 summation order)."""
  runs = {}
  for k in (1, 4):
    work = tmp_path / f"k{k}"
    r = cli(
      f"--workdir={work}",
      *TINY,
      DS + MIXED,
      "--config.pack_batches=false",
      f"--config.micro_batches={k}",
      "--config.reference.steps=60",
      "--config.method=iw_sft",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs[k] = json.loads((work / "result.json").read_text())
  np.testing.assert_allclose(runs[4]["return_mean"], runs[1]["return_mean"], rtol=1e-3)
  rows = {
    k: [json.loads(x) for x in (tmp_path / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
    for k in (1, 4)
  }
  loss = lambda k: [x["loss"] for x in rows[k] if x["kind"] == "train"]
  assert len(loss(1)) > 2
  np.testing.assert_allclose(loss(4), loss(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "bad",
  ["--config.curation.percentiles=(90,120)", "--config.curation.quality_beta=0"],
  ids=["percentile", "beta"],
)
def test_bad_input_with_overwrite_leaves_a_finished_run_as_it_was(datasets, tmp_path, bad):
  """Every setting is checked before --overwrite clears anything."""
  work = tmp_path / "done"
  (work / "policy").mkdir(parents=True)
  files = {"result.json": "{}", "run.json": '{"config": {}}', "policy/params": "weights"}
  for name, text in files.items():
    (work / name).write_text(text)
  r = cli(DS + MIXED, f"--workdir={work}", "--overwrite", bad, *TINY)
  assert r.returncode == 2 and "curation." in r.stderr, r.stderr[-2000:]
  assert {
    os.path.relpath(os.path.join(d, f), work): open(os.path.join(d, f)).read()
    for d, _, fs in os.walk(work)
    for f in fs
  } == files


def test_finished_run_is_not_overwritten(datasets, tmp_path):
  work = tmp_path / "done"
  work.mkdir()
  (work / "result.json").write_text("{}")
  r = cli(DS + MIXED, f"--workdir={work}", *TINY)
  assert r.returncode == 2 and "--overwrite" in r.stderr
  assert (work / "result.json").read_text() == "{}"


def _tiny_config(method="iw_sft"):
  from iwsft.control.config import get_config

  cfg = get_config()
  cfg.update(dataset=MIXED, method=method, steps_per_dispatch=20)
  cfg.policy.hidden = (32, 32)
  cfg.finetune.update(steps=40, batch_size=8, warmup_steps=5)
  cfg.eval.update(every=20, episodes=2, final_episodes=3)
  cfg.reference.update(steps=100, batch_size=8)
  return cfg


@pytest.mark.slow  # the core test_vmapped_seeds_train_like_separate_runs runs by default
def test_seeds_trained_together_match_seeds_run_one_by_one(datasets, tmp_path):
  """run_control_seeds vmaps two seeds through both stages; each must equal run_control of that
  seed."""
  import orbax.checkpoint as ocp

  from iwsft.control.pipeline import run_control, run_control_seeds

  cfg = _tiny_config()
  together = run_control_seeds(cfg, [3, 5], str(tmp_path / "group"), quiet=True)
  assert [r["seed"] for r in together] == [3, 5] and together[0]["seeds_trained_together"] == 2
  summary = json.loads((tmp_path / "group" / "result.json").read_text())
  assert [r["seed"] for r in summary["results"]] == [3, 5]
  for seed, r in zip([3, 5], together):
    alone_cfg = _tiny_config()
    alone_cfg.seed = seed
    alone = run_control(alone_cfg, str(tmp_path / f"alone{seed}"), quiet=True)
    cell = tmp_path / "group" / f"seed_{seed}"
    assert json.loads((cell / "result.json").read_text())["seed"] == seed
    a = ocp.StandardCheckpointer().restore(str(cell / "policy" / "params"))
    b = ocp.StandardCheckpointer().restore(str(tmp_path / f"alone{seed}" / "policy" / "params"))
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
    rows = lambda d: [
      (r["stage"], r["step"], r["kind"])
      for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
    ]
    assert rows(cell) == rows(tmp_path / f"alone{seed}")
    # same parameters, so the same evaluation episodes give (nearly) the same returns
    np.testing.assert_allclose(r["return_mean"], alone["return_mean"], rtol=0.05, atol=1.0)
  # rerunning the group reuses it; other seeds in the same (finished) workdir are refused
  again = run_control_seeds(cfg, [3, 5], str(tmp_path / "group"), quiet=True)
  assert again == together
  from iwsft.errors import UserError

  with pytest.raises(UserError, match="already holds a finished run"):
    run_control_seeds(cfg, [3, 6], str(tmp_path / "group"), quiet=True)
  with pytest.raises(UserError, match="val_fraction"):
    cfg.val_fraction = 0.2
    run_control_seeds(cfg, [0, 1], str(tmp_path / "split"), quiet=True)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_corrupt_run_json_is_one_line_exit_2_and_nothing_is_overwritten(datasets, tmp_path):
  work = tmp_path / "torn"
  work.mkdir()
  (work / "run.json").write_text('{"config": {"dataset": ')
  (work / "metrics.jsonl").write_text("keep me\n")
  r = cli(DS + MIXED, f"--workdir={work}", *TINY)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
  assert len(lines) == 1 and "run.json is corrupt" in lines[0], r.stderr
  assert (work / "run.json").read_text() == '{"config": {"dataset": '
  assert sorted(os.listdir(work)) == ["metrics.jsonl", "run.json"]


def _recorded(n: int) -> list:
  """n of the expert dataset's episodes as write_episodes takes them."""
  from types import SimpleNamespace

  import minari

  return [
    SimpleNamespace(
      observations=e.observations,
      actions=e.actions,
      rewards=e.rewards,
      terminated=e.terminations[-1],
      truncated=e.truncations[-1],
      seed=i,
    )
    for i, e in enumerate(minari.load_dataset(EXPERT).sample_episodes(n))
  ]


def test_a_written_dataset_names_the_commit_that_wrote_it_without_warnings(datasets):
  """write_episodes gives Minari an author and the code's version with its git commit (checked
  against git itself), so Minari has nothing to warn about and the dataset records its code."""
  import minari

  from iwsft.datasets.collect import write_episodes

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    write_episodes(
      "iwsft/pendulum-test/provenance-v0", "InvertedPendulum-v5", _recorded(2), 5.0, 37.0
    )
  assert [str(w.message) for w in caught if "minari" in w.filename] == []
  meta = minari.load_dataset("iwsft/pendulum-test/provenance-v0").storage.metadata
  assert meta["author"] == {"iwsft"}
  assert meta["code_permalink"].startswith(code_of_checkout())


def test_evaluation_runs_in_the_environment_the_dataset_names_for_it(datasets, tmp_path):
  """A dataset recorded in InvertedPendulum-v5 (1000 steps) that names a 37-step copy of it for
  evaluation: the run's evaluation environment is that copy (recover_environment(eval_env=True))."""
  import gymnasium as gym

  from iwsft.control.pipeline import prepare, validate
  from iwsft.datasets.collect import write_episodes

  did = "iwsft/pendulum-test/eval-env-v0"
  short = gym.make("InvertedPendulum-v5", max_episode_steps=37).spec
  write_episodes(did, "InvertedPendulum-v5", _recorded(4), 5.0, 37.0, eval_env=short)
  cfg = _tiny_config("bc")
  cfg.update(dataset=did, num_devices=1)
  cfg.reference.batch_size = 4
  run = prepare(validate(cfg), [0], quiet=True)
  assert gym.spec("InvertedPendulum-v5").max_episode_steps == 1000
  assert run.data.env_spec.max_episode_steps == 37


def test_download_with_no_reachable_remote_is_one_line_exit_2(datasets, tmp_path):
  """--download of a remote Minari id when the hub cannot be reached (HF_ENDPOINT points at a
  closed local port, so the test never touches the network): one line, exit 2, no retries, nothing
  written."""
  import time

  env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}
  t0 = time.time()
  r = subprocess.run(
    [
      sys.executable,
      "experiments/control.py",
      f"--workdir={tmp_path / 'work'}",
      *TINY,
      "--config.dataset=mujoco/hopper/medium-v0",
      "--config.download=True",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
  assert len(lines) == 1 and "unreachable" in lines[0] and "127.0.0.1:9" in lines[0], r.stderr
  assert time.time() - t0 < 30 and not (tmp_path / "work").exists()


def test_exported_policy_is_the_mean_action_and_a_video_is_recorded(datasets, tmp_path):
  """policy.jaxexport, run through jax.export alone, equals the mean action computed in numpy from
  the saved weights (normalise, ReLU MLP, tanh, scale to the box), at batch sizes 1 and 7; the run
  also wrote the video of its final policy."""
  import jax
  import orbax.checkpoint as ocp

  work = tmp_path / "run"
  r = cli(
    DS + MIXED, "--config.method=bc", f"--workdir={work}", *TINY, "--config.eval.video_episodes=1"
  )
  assert r.returncode == 0, r.stderr[-2000:]
  policy_dir = work / "policy"
  with open(policy_dir / "policy.jaxexport", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  info = json.loads((policy_dir / "policy.json").read_text())
  assert info["obs_dim"] == 4 and info["act_dim"] == 1 and info["env_id"] == "InvertedPendulum-v5"
  ckpt = ocp.StandardCheckpointer()
  params = ckpt.restore(policy_dir / "params")
  consts = ckpt.restore(policy_dir / "constants")
  np_val = lambda x: np.asarray(x["value"] if isinstance(x, dict) else x, np.float64)
  layers = [params["hidden"][k] for k in sorted(params["hidden"], key=int)] + [params["mean_head"]]
  obs = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
  x = (obs - np_val(consts["obs_mean"])) / np_val(consts["obs_std"])
  for i, layer in enumerate(layers):
    x = x @ np_val(layer["kernel"]) + np_val(layer["bias"])
    x = np.maximum(x, 0) if i < len(layers) - 1 else np.tanh(x)
  expected = np_val(consts["act_centre"]) + np_val(consts["act_scale"]) * x
  # float32 against float64: a few float32 ulps of the hidden layers' scale, not of the output's
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(exported.call(obs)), expected, **tol)
  np.testing.assert_allclose(np.asarray(exported.call(obs[:1])), expected[:1], **tol)
  result = json.loads((work / "result.json").read_text())
  assert (work / "video.gif").stat().st_size > 10_000 and (work / "video_frames.png").exists()
  final = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()][-1]
  assert len(final["video_returns"]) == 1 and result["return_mean"] > 0


def test_example_drives_the_exported_policy_without_iwsft(datasets, tmp_path):
  work = tmp_path / "run"
  assert cli(DS + MIXED, "--config.method=bc", f"--workdir={work}", *TINY).returncode == 0
  env = {**os.environ, "PYTHONPATH": ""}
  code = (
    "import sys, runpy; sys.modules['iwsft'] = None; sys.argv = ['x', sys.argv[1], '--episodes=2'];"
    " runpy.run_path('examples/run_exported_policy.py', run_name='__main__')"
  )
  r = subprocess.run(
    [sys.executable, "-c", code, str(work / "policy")],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [line for line in r.stdout.splitlines() if "episode" in line]
  assert len(lines) == 2 and all("return" in line for line in lines)
