"""Curation: which sequences a method trains on, and how often, as sampling log-weights.

Every method samples sequences (episodes or completions) from a fixed pool in proportion to
exp(logits[i]); logits of -inf exclude a sequence. This one representation covers:

  BC / SFT on all data        uniform logits (all 0)
  filtered BC (top fraction)  0 for kept sequences, -inf for the rest
  stratified percentiles      log(multiplicity): the best sequences appear up to len(percentiles)
  times
  SFT(Q) in "sample" mode     score / β   (sampling ∝ exp(normalised score / β))

Pure numpy: curation happens once, on the host, before training.
"""

from __future__ import annotations

import numpy as np

from iwsft.errors import UserError


def check_top_fraction(top_fraction: float) -> None:
  if not (0.0 < top_fraction <= 1.0) or not np.isfinite(top_fraction):
    raise UserError(f"top_fraction must be in (0, 1], got {top_fraction}")


# SFT(Q)'s use of the quality score: "sample" sequences ∝ exp(normalised score / β), "weight"
# their losses by it, or "linear": sample ∝ the normalised score itself (the bound's reward R ≥ 0)
QUALITY_MODES = ("sample", "weight", "linear")


def check_percentiles(percentiles) -> None:
  for p in percentiles:
    if not 0.0 <= p < 100.0:
      raise UserError(f"percentiles must lie in [0, 100), got {p}")


def check_quality(beta: float, mode: str = "sample") -> None:
  if not beta > 0:
    raise UserError(f"quality temperature beta must be > 0, got {beta}")
  if mode not in QUALITY_MODES:
    raise UserError(f"quality_mode must be one of {', '.join(QUALITY_MODES)}, got {mode!r}")


def top_fraction_mask(scores: np.ndarray, top_fraction: float) -> np.ndarray:
  """[N] scores -> [N] bool: the ceil(top_fraction · N) highest-scoring sequences (ties by
  index)."""
  check_top_fraction(top_fraction)
  n = len(scores)
  if n == 0:
    raise UserError("cannot filter an empty dataset")
  k = max(1, int(np.ceil(top_fraction * n - 1e-9)))
  order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
  keep = np.zeros(n, dtype=bool)
  keep[order[:k]] = True
  return keep


def percentile_multiplicity(scores: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
  """[N] scores -> [N] int: in how many of the sets {score >= percentile p} each sequence lies.

  The authors' stratified oversampling: the curated set is the concatenation of the sets at the
  90th, 95th and 98th return percentiles, so the best sequences appear up to three times.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.size == 0:
    raise UserError("cannot filter an empty dataset")
  check_percentiles(percentiles)
  return sum((scores >= np.percentile(scores, p)).astype(np.int64) for p in percentiles)


def normalise_scores(scores: np.ndarray) -> np.ndarray:
  """Affine map of [N] scores onto [0, 1] (all 1 when every score is equal)."""
  scores = np.asarray(scores, dtype=np.float64)
  lo, hi = scores.min(), scores.max()
  if hi - lo <= 0:
    return np.ones_like(scores)
  return (scores - lo) / (hi - lo)


def quality_logits(scores: np.ndarray, beta: float) -> np.ndarray:
  """[N] raw scores -> [N] log-weights normalised_score / β (SFT(Q): weight ∝ exp(score/β))."""
  check_quality(beta)
  return normalise_scores(scores) / beta


def quality_weights(scores: np.ndarray, beta: float) -> np.ndarray:
  """[N] raw scores -> [N] weights ∝ exp(normalised score / β), mean 1 (SFT(Q) in "weight" mode)."""
  logits = quality_logits(scores, beta)
  w = np.exp(logits - logits.max())
  return w / w.mean()


def sampling_logits(
  scores: np.ndarray,
  method: str,
  *,
  top_fraction: float = 0.1,
  percentiles: tuple[float, ...] = (),
  quality_beta: float = 0.1,
  quality_mode: str = "sample",
) -> np.ndarray:
  """[N] sequence scores (e.g. episode returns) -> [N] float32 sampling logits for a method.

  method: "bc" / "bc_continued" / "sft" (all data), "filtered_bc" / "iw_sft" (curated subset:
  the top `top_fraction`, or the stratified `percentiles` if given), "sft_q" / "iw_sft_q"
  (quality).
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.size == 0:
    raise UserError("the dataset has no sequences")
  if method in ("bc", "bc_continued", "sft"):
    return np.zeros(len(scores), np.float32)
  if method in ("filtered_bc", "iw_sft"):
    if percentiles:
      mult = percentile_multiplicity(scores, percentiles)
    else:
      mult = top_fraction_mask(scores, top_fraction).astype(np.int64)
    with np.errstate(divide="ignore"):
      return np.log(mult.astype(np.float64)).astype(np.float32)
  if method in ("sft_q", "iw_sft_q"):
    if quality_mode == "sample":
      return quality_logits(scores, quality_beta).astype(np.float32)
    if quality_mode == "weight":
      return np.zeros(len(scores), np.float32)
    if quality_mode == "linear":
      with np.errstate(divide="ignore"):
        return np.log(normalise_scores(scores)).astype(np.float32)
    check_quality(quality_beta, quality_mode)
  raise UserError(f"unknown method {method!r}")
