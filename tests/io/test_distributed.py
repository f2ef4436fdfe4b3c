"""Two processes on localhost (gloo CPU collectives, 4 forced devices each) against one process with
8 devices: the same global batches, so the same training within float tolerance, while each process
reads only its share of the dataset."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import MIXED, control_flags, save_tiny_pretrained, write_sum_records
from test_resume import params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROL = [
  os.path.join(ROOT, "experiments", "control.py"),
  f"--config.dataset={MIXED}",
  "--config.method=iw_sft",
  *control_flags(
    eval__final_episodes=2, checkpoint_every=20, policy__normalise_observations="true"
  ),
]


def env(devices):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(args, work, reads=None):
  """Both processes of a run; with reads (a path prefix), each records the Minari episodes it reads
  (tests/helpers/record_reads.py)."""
  port = free_port()
  e = env(4)
  prefix = []
  if reads is not None:
    e["IWSFT_READS"] = str(reads)
    prefix = [os.path.join(ROOT, "tests", "helpers", "record_reads.py")]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        *prefix,
        *args,
        f"--workdir={work}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=e,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def run_one_process(args, work):
  """The same run in one process with the 8 devices the two processes share."""
  one = subprocess.run(
    [sys.executable, *args, f"--workdir={work}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env(8),
    timeout=600,
  )
  assert one.returncode == 0, one.stderr[-3000:]


def train_rows(work):
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["kind"] == "train"]


def test_two_processes_train_the_control_policy_like_one_process_with_as_many_devices(
  datasets, tmp_path
):
  run_one_process(CONTROL, tmp_path / "one")
  outs = run_two_processes(CONTROL, tmp_path / "two", reads=tmp_path / "reads")
  assert (
    "normalised score" in outs[0][0] and "normalised score" not in outs[1][0]
  )  # process 0 reports
  # Each process read only its half of the episodes: disjoint shares that cover the dataset.
  import minari

  shares = []
  for path in sorted(tmp_path.glob("reads.*")):
    ids = [i for r in json.loads(path.read_text()) if r["dataset"] == MIXED for i in r["episodes"]]
    shares.append(ids)
  total = minari.load_dataset(MIXED).total_episodes
  assert len(shares) == 2 and all(0 < len(ids) < total for ids in shares), [len(x) for x in shares]
  assert sorted(shares[0] + shares[1]) == list(range(total))
  result = json.loads((tmp_path / "two" / "result.json").read_text())
  assert len(result["devices"]) == 8
  for a, b in zip(params(tmp_path / "two"), params(tmp_path / "one"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  ra, rb = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
  assert [(r["stage"], r["step"]) for r in ra] == [(r["stage"], r["step"]) for r in rb]
  np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=1e-4, atol=1e-5)


LM = [
  os.path.join(ROOT, "experiments", "lm.py"),
  "--config.model.d_model=32",
  "--config.model.n_layers=1",
  "--config.model.n_heads=2",
  "--config.model.d_ff=512",
  "--config.model.max_len=48",
  "--config.task.digits=1",
  "--config.task.demos=256",
  "--config.task.sample_prompts=16",
  "--config.task.samples_per_prompt=2",
  "--config.task.eval_problems=16",
  "--config.reference.steps=200",
  "--config.reference.batch_size=16",
  "--config.reference.warmup_steps=5",
  "--config.finetune.steps=20",
  "--config.finetune.batch_size=8",
  "--config.finetune.warmup_steps=2",
  "--config.steps_per_dispatch=10",
  "--config.methods=sft",
  "--config.methods=iw_sft",
  "--config.fsdp=2",
]  # the MLP matrices (32 x 512 = 2^14) split over fsdp pairs
# within a process, replicated across the processes


@pytest.mark.slow
def test_two_processes_run_every_lm_stage_like_one_process_with_as_many_devices(tmp_path):
  import jax
  from flax import nnx

  from iwsft.io import checkpoint
  from iwsft.lm.model import LMConfig, Transformer

  run_one_process(LM, tmp_path / "one")
  run_two_processes(LM, tmp_path / "two")
  template = nnx.state(
    Transformer(LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=512, max_len=48), rngs=nnx.Rngs(0))
  )
  for name in ("reference", "sft", "iw_sft"):
    a = checkpoint.restore_state(str(tmp_path / "one" / "seed_0" / name / "params"), template)
    b = checkpoint.restore_state(str(tmp_path / "two" / "seed_0" / name / "params"), template)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  assert (tmp_path / "two" / "seed_0" / "samples.jsonl").read_text() == (
    tmp_path / "one" / "seed_0" / "samples.jsonl"
  ).read_text()
  res = [json.loads((tmp_path / w / "seed_0" / "result.json").read_text()) for w in ("one", "two")]
  scores = lambda r: {
    m: {k: v for k, v in s.items() if k != "train_tokens_per_s"} for m, s in r["models"].items()
  }
  assert scores(res[0]) == scores(res[1])  # everything but the wall-clock throughput


def test_two_processes_read_a_pretrained_model_onto_the_mesh_and_export_it(
  tmp_path, smollm2_tokenizer
):
  """A pretrained model (a tiny random Llama with SmolLM2's tokenizer) read tensor by tensor onto
  an 8-way FSDP mesh by two processes, each placing its own devices' shards, LoRA-fine-tuned on
  records and exported in bfloat16 as a collective: what one process with 8 devices makes."""
  import jax

  from iwsft.lm import checkpoints

  model_dir, data = tmp_path / "model", tmp_path / "mine.jsonl"
  _, base = save_tiny_pretrained(model_dir, smollm2_tokenizer, d_ff=64)
  write_sum_records(
    data, [(12, 30), (45, 21), (8, 70), (33, 33), (5, 94), (61, 7), (20, 20), (9, 9)]
  )
  args = [
    os.path.join(ROOT, "experiments", "lm.py"),
    "--config=iwsft/lm/config.py:smollm2",
    f"--config.model.path={model_dir}",
    f"--config.data={data}",
    "--config.stages=finetune",
    "--config.methods=iw_sft",
    "--config.model.lora_rank=4",
    "--config.model.train_layers=0",
    "--config.fsdp=8",
    "--config.finetune.steps=4",
    "--config.finetune.warmup_steps=1",
    "--config.finetune.learning_rate=1e-2",
    "--config.steps_per_dispatch=2",
    "--config.export_dtype=bfloat16",
  ]
  run_one_process(args, tmp_path / "one")
  run_two_processes(args, tmp_path / "two")
  exported = [
    checkpoints.load_hf(str(tmp_path / w / "seed_0" / "iw_sft" / "hf"), 64)[2]
    for w in ("one", "two")
  ]
  for x, y in zip(*(jax.tree.leaves(e) for e in exported), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-2, atol=1e-3)
  base = jax.tree.leaves(base)
  moved = [
    not np.allclose(np.asarray(x), np.asarray(b), atol=1e-2)
    for x, b in zip(jax.tree.leaves(exported[1]), base)
  ]
  assert any(moved)


@pytest.mark.parametrize(
  "scan", [pytest.param("0", marks=pytest.mark.slow), "1"], ids=["blocks", "scanned"]
)
def test_two_processes_export_a_split_model_each_writing_its_own_files(tmp_path, scan):
  """Parameters split over both processes' devices (fsdp 4 x model 2), exported in several
  files: each process writes a disjoint share of them, no parameter is gathered into every
  process, and the directory reads back as the model (per layer, or scanned: a layer at a time)."""
  import jax
  from flax import nnx

  from iwsft.lm import checkpoints
  from iwsft.lm.model import Transformer, stack_blocks

  sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
  from export_script import CFG

  port, work = free_port(), tmp_path / "hf"
  script = os.path.join(ROOT, "tests", "helpers", "export_script.py")
  procs = [
    subprocess.Popen(
      [sys.executable, script, str(work), str(port), str(i), scan],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=env(4),
    )  # fmt: skip
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  wrote = [set(json.loads(out.strip().splitlines()[-1])["wrote"]) for out, _ in outs]
  index = json.loads((work / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert wrote[0] and wrote[1] and not wrote[0] & wrote[1] and wrote[0] | wrote[1] == files
  want = nnx.to_pure_dict(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param))
  _, _, back = checkpoints.load_hf(str(work), max_len=16, scan_layers=scan == "1")
  back = nnx.to_pure_dict(back)
  if scan == "1":
    want = stack_blocks(want)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
