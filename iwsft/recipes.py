"""The authors' two recipes as named objective presets (Qin & Springenberg, 2025, public code).

  CONTROL       per-episode weight exp(10 · mean_t log q/π_ref), clipped to [0, 1000] and divided
                by the batch mean; loss the mean over episodes of the length-normalised NLL; q an
                EMA of the policy with decay 0.9.
  CONTROL_STEP  their per-step variant: each step weighted by exp(10 · (log q − log π_ref))
                clipped to [0, 2].
  LM            per-completion weight exp(mean over tokens of log q/π_ref), clipped to [0, 16], not
                normalised; loss the weighted token NLL summed over the batch / its token count;
                q the current model, detached.
  LM_STEP       their per-token variant: each token's ratio clipped to [0.2, 1.8].
  SFT           plain SFT / BC (no weights), for comparison.

docs/objectives.md lists every place this codebase departs from the authors' code.
"""

from __future__ import annotations

import dataclasses

from iwsft.core.objectives import ObjectiveConfig

CONTROL = ObjectiveConfig(
  importance_weighting="sequence",
  temperature=10.0,
  w_min=0.0,
  w_max=1000.0,
  self_normalise=True,
  length_normalise=True,
  reduction="sequence_mean",
  q_decay=0.9,
)
CONTROL_STEP = dataclasses.replace(
  CONTROL, importance_weighting="step", step_w_min=0.0, step_w_max=2.0
)
LM = ObjectiveConfig(
  importance_weighting="sequence",
  temperature=1.0,
  w_min=0.0,
  w_max=16.0,
  self_normalise=False,
  length_normalise=True,
  reduction="token_mean",
  q_decay=0.0,
)
LM_STEP = dataclasses.replace(LM, importance_weighting="step", step_w_min=0.2, step_w_max=1.8)
SFT = ObjectiveConfig(importance_weighting="none", q_decay=0.0)

PRESETS = {
  "control": CONTROL,
  "control_step": CONTROL_STEP,
  "lm": LM,
  "lm_step": LM_STEP,
  "sft": SFT,
}
