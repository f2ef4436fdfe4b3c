"""One language run: validate -> load π_ref -> claim the workdir -> the selected stages in order.

Every setting is checked (settings.check_settings, then the model's own checks in load_model)
before the workdir is touched. A training stage interrupted part-way resumes from
checkpoints/<stage> when run again; run.json holds the settings, and a rerun with other settings
is refused unless overwrite. The stages (stages.py) use the shared objective, update step and loop
(iwsft.core).
"""

from __future__ import annotations

import os

from iwsft.core import sharding
from iwsft.errors import UserError
from iwsft.io import distributed, tracking
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard
from iwsft.lm import answers
from iwsft.lm import data as lm_data
from iwsft.lm.config import LM_METHODS, STAGES, get_config
from iwsft.lm.settings import (
  Model,
  Settings,
  check_settings,
  encode,
  load_model,
  prompt_ids,
  run_identity,
)
from iwsft.lm.stages import STAGE_FUNCTIONS, Context

# Everything a run writes to its workdir (removed by --overwrite when the settings changed).
OUTPUTS = (
  "reference",
  *LM_METHODS,
  "checkpoints",
  "samples.jsonl",
  "sample_info.json",
  "curated.jsonl",
  "scored.jsonl",
  "result.json",
  "table.md",
  "metrics.jsonl",
  "tensorboard",
)


def _user_records(s: Settings, model: Model) -> list | None:
  """The records of --config.data, checked whole (every one encoded), or None."""
  if not s.data:
    return None
  records = lm_data.read_jsonl(s.data)
  encode(s, model, records, s.data)
  if "sft_q" in s.methods and any(r.score is None for r in records):
    raise UserError(f"{s.data}: sft_q needs a 'score' on every record")
  return records


def _eval_problems(s: Settings, model: Model) -> list | None:
  """The (prompt, answer) pairs of --config.eval_data, each prompt checked to leave room in the
  context for an answer, or None."""
  if not s.eval_data:
    return None
  problems = answers.read_answers(s.eval_data)
  answers.MathAnswers(problems[:1])  # math-verify installed and the answers parse
  for n, (prompt, _) in enumerate(problems, 1):
    if len(prompt_ids(s.task, model.tok, prompt)) + 2 > model.mcfg.max_len:
      raise UserError(
        f"{s.eval_data}:{n}: the prompt leaves no room for an answer in model.max_len "
        f"{model.mcfg.max_len}"
      )
  return problems


def prepare(cfg, workdir: str, overwrite: bool = False, quiet: bool = False) -> Context:
  """Validates everything, then claims the workdir (process 0 writes) and opens the metrics log."""
  s = check_settings(cfg)
  mesh = sharding.make_mesh(s.num_devices or None, s.fsdp, s.tensor_parallel)
  model = load_model(s, mesh)
  for stage in (s.reference, s.finetune):
    sharding.check_batch_size(stage.batch_size, mesh, s.micro_batches)
  if s.packed_rows % sharding.batch_devices(mesh):
    raise UserError(
      f"packed_rows {s.packed_rows} must be a multiple of the {sharding.batch_devices(mesh)} "
      "data-parallel devices (each packs its own sequences)"
    )
  records = _user_records(s, model)
  problems = _eval_problems(s, model)
  # Stages and methods may differ between calls on one workdir; the device count may change too.
  identity = {**workdir_lib.result_settings(cfg, "stages", "methods"), **run_identity()}
  workdir = os.path.abspath(os.path.expanduser(workdir))
  primary = distributed.is_primary()  # only process 0 writes; checkpoints are collective
  if primary:
    defaults = workdir_lib.result_settings(get_config(), "stages", "methods")
    _, changed = workdir_lib.claim_workdir(workdir, identity, overwrite, "", defaults)
    if changed:  # only reachable with overwrite
      workdir_lib.remove_outputs(workdir, OUTPUTS)
  distributed.barrier("workdir")
  log = (
    tracking.open_log(os.path.join(workdir, "metrics.jsonl"), s.tracking, config=s.config)
    if primary
    else workdir_lib.NullLog()
  )
  return Context(
    s, model, mesh, workdir, overwrite, quiet, log, PreemptionGuard(), records, problems
  )


def run_lm(cfg, workdir: str, overwrite: bool = False, quiet: bool = False) -> dict | None:
  """Runs the selected stages in order; returns the result dict when 'evaluate' ran."""
  ctx = prepare(cfg, workdir, overwrite, quiet)
  s, result = ctx.settings, None
  try:
    with ctx.guard:
      for stage in STAGES:
        skipped = ctx.user_records is not None and stage in ("sample", "curate")
        if stage in s.stages and not skipped:
          out = STAGE_FUNCTIONS[stage](ctx)
          distributed.barrier(stage)  # the next stage may read what process 0 wrote
          if stage == "evaluate":
            result = out
  finally:
    ctx.log.close()
  return result
