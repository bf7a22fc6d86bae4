"""The report's curves as PNG bytes: loss (train and eval), learning rate, grad norm, throughput, memory."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from sftkit.report.read import RunRecord  # noqa: E402

TRAIN_COLOR, EVAL_COLOR, MARK_COLOR = "#1f77b4", "#d62728", "#ff7f0e"


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; missing or non-finite values become NaN, which matplotlib leaves as gaps."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        steps.append(row["step"])
        values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return steps, values


def _has_values(values: list[float]) -> bool:
    return any(not math.isnan(value) for value in values)


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _axes(title: str, ylabel: str, wide: bool = False) -> tuple[plt.Figure, plt.Axes]:
    figure, axes = plt.subplots(figsize=(11, 3.6) if wide else (5.4, 3.0))
    axes.set_title(title, fontsize=11, loc="left")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def loss_plot(record: RunRecord) -> bytes:
    """Train and eval loss, the best eval marked, and the step of every diagnosis finding."""
    figure, axes = _axes("Loss", "loss (mean per trained token)", wide=True)
    steps, losses = _series(record.train_rows, "loss")
    axes.plot(steps, losses, color=TRAIN_COLOR, linewidth=1.4, label="train")
    eval_steps, eval_losses = _series(record.eval_rows, "eval_loss")
    if _has_values(eval_losses):
        axes.plot(eval_steps, eval_losses, color=EVAL_COLOR, marker="o", markersize=4, linewidth=1.4, label="eval")
        best = min((value, step) for step, value in zip(eval_steps, eval_losses) if not math.isnan(value))
        axes.scatter([best[1]], [best[0]], s=90, facecolors="none", edgecolors="black", zorder=5,
                     label=f"best eval {best[0]:.4g} @ {best[1]}")
    for finding in record.findings:
        axes.axvline(finding["step"], color=MARK_COLOR, alpha=0.6, linestyle="--", linewidth=1)
    if record.findings:
        axes.plot([], [], color=MARK_COLOR, linestyle="--", label="diagnosis finding")
    axes.legend(fontsize=9)
    return _png(figure)


def metric_plot(record: RunRecord, title: str, ylabel: str, keys: dict[str, str], log_scale: bool = False,
                from_zero: bool = False) -> bytes | None:
    """One small plot of train-row metrics (`keys` maps metric to legend label); None when none were logged.
    `from_zero` keeps 0 on the axis, so a flat throughput or memory curve does not look noisy."""
    curves = {label: _series(record.train_rows, key) for key, label in keys.items()}
    curves = {label: series for label, series in curves.items() if _has_values(series[1])}
    if not curves:
        return None
    figure, axes = _axes(title, ylabel)
    for label, (steps, values) in curves.items():
        axes.plot(steps, values, linewidth=1.3, label=label)
    if log_scale and all(value > 0 for _, values in curves.values() for value in values if not math.isnan(value)):
        axes.set_yscale("log")
    if from_zero:
        axes.set_ylim(bottom=0, top=axes.get_ylim()[1] * 1.05)
    if len(curves) > 1:
        axes.legend(fontsize=9)
    return _png(figure)


def all_plots(record: RunRecord) -> dict[str, bytes]:
    """Title → PNG, in report order; metrics the run did not log are left out."""
    plots = {"Loss": loss_plot(record)}
    small = {
        "Learning rate": metric_plot(record, "Learning rate", "lr", {"lr": "lr"}),
        "Gradient norm": metric_plot(record, "Gradient norm (before clipping)", "grad norm",
                                     {"grad_norm": "grad norm"}, log_scale=True),
        "Throughput": metric_plot(record, "Throughput", "tokens / s",
                                  {"tokens_per_s": "all tokens", "trained_tokens_per_s": "trained tokens"},
                                  from_zero=True),
        "Memory": metric_plot(record, "Peak memory", "GiB", {"memory_gb": "peak memory"}, from_zero=True),
    }
    plots.update({title: png for title, png in small.items() if png is not None})
    return plots
