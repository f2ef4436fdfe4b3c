"""Figures written by the experiment scripts (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(rows: list[dict], path: str, title: str) -> None:
  """Evaluation score (normalised ×100, else raw return) and training loss against update step.

  rows: the metrics.jsonl rows; stages are drawn one after another on a shared step axis.
  """
  stages = []
  for r in rows:
    if r["stage"] not in stages:
      stages.append(r["stage"])
  offsets, total = {}, 0
  for s in stages:
    offsets[s] = total
    total += max((r["step"] for r in rows if r["stage"] == s), default=0)
  evals = [r for r in rows if r["kind"] == "eval" and r.get("return_mean") is not None]
  use_norm = bool(evals) and all(r.get("normalised_score") is not None for r in evals)
  key, label = (
    ("normalised_score", "normalised score ×100") if use_norm else ("return_mean", "return")
  )
  fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
  for s in stages:
    ev = [r for r in evals if r["stage"] == s]
    if ev:
      x = [offsets[s] + r["step"] for r in ev]
      y = [r[key] for r in ev]
      std = [r.get("normalised_score_std" if use_norm else "return_std") or 0.0 for r in ev]
      ax_score.plot(x, y, marker="o", label=s)
      ax_score.fill_between(
        x, [a - b for a, b in zip(y, std)], [a + b for a, b in zip(y, std)], alpha=0.2
      )
    tr = [r for r in rows if r["kind"] == "train" and r["stage"] == s]
    ax_loss.plot([offsets[s] + r["step"] for r in tr], [r["loss"] for r in tr], label=s)
  for s in stages[1:]:
    for ax in (ax_score, ax_loss):
      ax.axvline(offsets[s], color="grey", lw=0.8, ls="--")
  ax_score.set(xlabel="update step", ylabel=label, title="evaluation (mean ± std over episodes)")
  ax_loss.set(xlabel="update step", ylabel="loss", title="training loss")
  for ax in (ax_score, ax_loss):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, path, title)


def _save(fig, path: str, title: str) -> None:
  # at fontsize 10 a line holds about 13 characters per inch of figure: wrap longer ones
  width = max(20, int(13 * fig.get_figwidth()))
  fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def band_panels(
  panels: dict[str, dict[str, tuple]],
  path: str,
  xlabel: str,
  ylabel: str | dict[str, str],
  title: str,
  log_x: bool = False,
) -> None:
  """One panel per key of `panels` (e.g. a dataset), one line per series with a shaded band.

  panels[name][series] = (steps [T], mean [T], low [T], high [T]), e.g. from aggregate.curve_band;
  ylabel: one for all panels, or {name: its own}; log_x: x on a log scale, marked at the x values.
  """
  n = max(1, len(panels))
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
  for ax, (name, series) in zip(axes[0], panels.items()):
    for i, (label, (x, mean, lo, hi)) in enumerate(series.items()):
      ax.plot(x, mean, label=label, color=f"C{i}", marker="o" if log_x else None, ms=3)
      ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
    if log_x:
      ticks = sorted({v for x, *_ in series.values() for v in x})
      ax.set_xscale("log")
      ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
      ax.minorticks_off()
    label = ylabel.get(name, "") if isinstance(ylabel, dict) else ylabel
    ax.set(title=name, xlabel=xlabel, ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save(fig, path, title)


def curves_and_levels(
  curves: dict[str, dict[str, tuple]],
  levels: dict[str, dict[str, float]],
  path: str,
  xlabel: str,
  ylabel: str,
  title: str,
  marker: tuple[float, str] | None = None,
) -> None:
  """One panel per key: curves[name][series] = (x, mean, low, high) as lines with bands, and
  levels[name][series] = y as dashed horizontal lines; `marker` (x, label) a dotted vertical."""
  names = list(curves)
  fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names) + 1.8, 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    for i, (label, (x, mean, lo, hi)) in enumerate(curves[name].items()):
      ax.plot(x, mean, label=label, color=f"C{i}", marker="o", ms=3)
      ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
    for j, (label, y) in enumerate(levels.get(name, {}).items()):
      ax.axhline(y, ls="--", lw=1.2, color=f"C{j + len(curves[name])}", label=label)
    if marker is not None:
      ax.axvline(marker[0], ls=":", color="0.3", label=marker[1])
    ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  right = 1 - 1.8 / fig.get_figwidth()  # the legend's column
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8)
  width = max(20, int(13 * fig.get_figwidth() * right))
  fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=10)
  fig.tight_layout(rect=(0, 0, right, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def score_bars(
  rows: list[dict],
  path: str,
  ylabel: str,
  title: str,
  name: str = "method",
  points: list[list[float]] | None = None,
) -> None:
  """A bar per summary row (report.summarise's: mean, ci_low, ci_high), labelled row[name], with
  its CI as the error bar; `points` draws each row's individual values (its seeds) over it."""
  names, means = [r[name] for r in rows], [r["mean"] for r in rows]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(names)), 3.8 + 0.3 * (len(names) > 4)))
  yerr = [[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]]
  ax.bar(names, means, yerr=yerr, capsize=6, color="C0", alpha=0.6, ecolor="0.25")
  for i, values in enumerate(points or []):
    ax.scatter(
      i + 0.12 * (np.arange(len(values)) - (len(values) - 1) / 2),
      values,
      color="C1",
      s=18,
      zorder=3,
      label="seeds" if i == 0 else None,
    )
  if points:
    ax.legend(loc="best", fontsize=8)
  ax.set(ylabel=ylabel)
  if len(names) > 4:  # long lists of names: slanted, so they do not overlap
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
      label.set_horizontalalignment("right")
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path, title)


def paired_differences(rows: list[dict], path: str, xlabel: str, title: str, label=str) -> None:
  """A forest plot, one panel per (method, baseline) pair: per dataset (a row, named by
  `label(dataset)`), the mean difference with its CI as a whisker and each seed's difference as
  a dot; the line at 0 is "no difference". rows: report.paired_differences' rows."""
  pairs = list(dict.fromkeys((r["method"], r["baseline"]) for r in rows))
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  fig, axes = plt.subplots(
    1,
    len(pairs),
    figsize=(2.2 + 3.6 * len(pairs), 1.8 + 0.45 * len(datasets)),
    squeeze=False,
    sharey=True,
  )
  for ax, (method, baseline) in zip(axes[0], pairs):
    for r in (r for r in rows if (r["method"], r["baseline"]) == (method, baseline)):
      y = len(datasets) - 1 - datasets.index(r["dataset"])
      ax.errorbar(
        [r["mean"]],
        [y],
        xerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
        fmt="o",
        color="C0",
        capsize=4,
        label="mean, 95% CI" if y == len(datasets) - 1 else None,
      )
      seeds = "seeds" if y == len(datasets) - 1 else None
      ax.scatter(r["per_seed"], [y - 0.2] * len(r["per_seed"]), s=12, color="C1", label=seeds)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set(title=f"{method} − {baseline}", xlabel=xlabel, ylim=(-0.7, len(datasets) - 0.3))
    ax.grid(axis="x", alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()  # beside the last panel, off the data
  axes[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  axes[0][0].set_yticks(range(len(datasets)), [label(d) for d in reversed(datasets)], fontsize=8)
  _save(fig, path, title)


def behaviour_training(
  steps: list[int],
  returns: list[float],
  marks: dict[str, tuple[int, float]],
  path: str,
  title: str,
  target: float | None = None,
) -> None:
  """A behaviour learner's evaluation return against environment steps, with the snapshots chosen
  as behaviours marked (marks[name] = (step, return)) and the return it trained towards."""
  fig, ax = plt.subplots(figsize=(6.0, 3.6))
  ax.plot(steps, returns, marker=".", color="C0", label="evaluation (sampled actions)")
  for i, (name, (step, ret)) in enumerate(marks.items()):
    ax.scatter([step], [ret], s=70, color=f"C{i + 1}", zorder=3, label=name)
  if target is not None:
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:,.0f}")
  ax.set(xlabel="environment steps", ylabel="return")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path, title)
