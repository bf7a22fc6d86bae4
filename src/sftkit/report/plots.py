"""The report's curves as PNG bytes: loss and token accuracy (train and each eval set), loss per training
source and the realised mixture against its target (runs with several sources), learning rate, grad norm with
the clipping threshold, share of clipped steps, throughput, memory."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt

from sftkit.config import GENERATED_METRICS, eval_loss_key
from sftkit.report import summary
from sftkit.report.read import RunRecord, eval_loss_keys

TRAIN_COLOR, MARK_COLOR = "#1f77b4", "#ff7f0e"
EVAL_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SOURCE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2")


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; missing or non-finite values become NaN, which matplotlib leaves as gaps."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        steps.append(row["step"])
        values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return steps, values


def _source_series(rows: list[dict[str, Any]], key: str, name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one source in the per-source dict `key`; NaN where the window had none of it."""
    return _series([{"step": row["step"], "value": (row.get(key) or {}).get(name)} for row in rows], "value")


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


def _eval_label(key: str, suffix: str) -> str:
    """eval_loss → "eval", eval_gsm8k_loss → "eval gsm8k"."""
    name = key.removeprefix("eval_").removesuffix(suffix).strip("_")
    return f"eval {name}" if name else "eval"


def _eval_curves(axes: plt.Axes, record: RunRecord, suffix: str) -> None:
    """One curve per eval set for keys ending in `suffix`, the best value of metric_for_best_model circled."""
    best = summary.best_eval(record)
    for index, key in enumerate(eval_loss_keys(record.eval_rows)):
        key = key.removesuffix("_loss") + suffix
        steps, values = _series(record.eval_rows, key)
        if not _has_values(values):
            continue
        axes.plot(
            steps,
            values,
            color=EVAL_COLORS[index % len(EVAL_COLORS)],
            marker="o",
            markersize=4,
            linewidth=1.4,
            label=_eval_label(key, suffix),
        )
        if best and best[0] == key:
            axes.scatter(
                [best[1]],
                [best[2]],
                s=90,
                facecolors="none",
                edgecolors="black",
                zorder=5,
                label=f"best {best[2]:.4g} @ {best[1]} ({key})",
            )


def loss_plot(record: RunRecord) -> bytes:
    """Train loss, each eval set's loss, the best eval marked, and the step of every diagnosis finding."""
    figure, axes = _axes("Loss", "loss (mean per trained token)", wide=True)
    steps, losses = _series(record.train_rows, "loss")
    axes.plot(steps, losses, color=TRAIN_COLOR, linewidth=1.4, label="train")
    _eval_curves(axes, record, "_loss")
    for finding in record.findings:
        axes.axvline(finding["step"], color=MARK_COLOR, alpha=0.6, linestyle="--", linewidth=1)
    if record.findings:
        axes.plot([], [], color=MARK_COLOR, linestyle="--", label="diagnosis finding")
    axes.legend(fontsize=9)
    return _png(figure)


def task_metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The task metrics (eval_metric) logged in `rows`, first-seen order: eval_extract, eval_gsm8k_rouge, ..."""
    suffixes = tuple(f"_{name}" for name in GENERATED_METRICS)
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((key, None) for key in row if key.startswith("eval") and key.endswith(suffixes))
    return list(keys)


def task_metric_plot(record: RunRecord) -> bytes | None:
    """Each task metric (solid, left axis) beside its eval set's loss (dashed, right axis), so a metric that
    falls while the loss improves shows at a glance; None for runs without eval_metric."""
    keys = task_metric_keys(record.eval_rows)
    if not keys:
        return None
    figure, axes = _axes("Task metric and eval loss", "task metric", wide=True)
    loss_axes = axes.twinx()
    loss_axes.set_ylabel("eval loss")
    plotted_losses: set[str] = set()
    for index, key in enumerate(keys):
        color = EVAL_COLORS[index % len(EVAL_COLORS)]
        steps, values = _series([row for row in record.eval_rows if key in row], key)
        axes.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.6, label=summary.words(key))
        loss_key = eval_loss_key(key)
        if loss_key not in plotted_losses:
            plotted_losses.add(loss_key)
            steps, losses = _series(record.eval_rows, loss_key)
            loss_axes.plot(steps, losses, color=color, linestyle="--", linewidth=1.1, label=summary.words(loss_key))
    lines, labels = axes.get_legend_handles_labels()
    more_lines, more_labels = loss_axes.get_legend_handles_labels()
    axes.legend(lines + more_lines, labels + more_labels, fontsize=9)
    return _png(figure)


def source_loss_plot(record: RunRecord) -> bytes | None:
    """Train loss of each training source over its own trained tokens; None for a run with one source."""
    names = summary.source_names(record)
    curves = {name: _source_series(record.train_rows, "source_loss", name) for name in names}
    if len(names) < 2 or not any(_has_values(values) for _, values in curves.values()):
        return None
    figure, axes = _axes("Loss per source", "loss (mean per trained token)")
    for index, (name, (steps, values)) in enumerate(curves.items()):
        axes.plot(steps, values, color=SOURCE_COLORS[index % len(SOURCE_COLORS)], linewidth=1.3, label=name)
    steps, losses = _series(record.train_rows, "loss")
    axes.plot(steps, losses, color="#7f7f7f", linewidth=1, linestyle=":", label="all sources")
    axes.legend(fontsize=9)
    return _png(figure)


def mixture_plot(record: RunRecord) -> bytes | None:
    """Each source's share of the trained tokens so far (solid) against its target share (dashed, when
    the sources were mixed by weight); None for a run with one source."""
    names = summary.source_names(record)
    steps, shares = summary.realised_mixture(record)
    if len(names) < 2 or not steps:
        return None
    targets = summary.target_shares(record) or {}
    figure, axes = _axes("Mixture of trained tokens (so far)", "share of trained tokens")
    for index, name in enumerate(names):
        color = SOURCE_COLORS[index % len(SOURCE_COLORS)]
        axes.plot(steps, shares[name], color=color, linewidth=1.4, label=f"{name} {shares[name][-1]:.1%}")
        if name in targets:
            axes.axhline(
                targets[name], color=color, linestyle="--", linewidth=1, label=f"{name} target {targets[name]:.1%}"
            )
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, ncol=2)
    return _png(figure)


def accuracy_plot(record: RunRecord) -> bytes | None:
    """Token accuracy on trained tokens (argmax = target), train and each eval set; None for runs that did
    not log it."""
    steps, accuracy = _series(record.train_rows, "token_accuracy")
    if not _has_values(accuracy):
        return None
    figure, axes = _axes("Token accuracy (trained tokens)", "argmax = target")
    axes.plot(steps, accuracy, color=TRAIN_COLOR, linewidth=1.3, label="train")
    _eval_curves(axes, record, "_token_accuracy")
    axes.set_ylim(bottom=0, top=min(1.0, axes.get_ylim()[1] * 1.05))
    axes.legend(fontsize=9)
    return _png(figure)


def grad_norm_plot(record: RunRecord) -> bytes | None:
    """Grad norm before clipping (log scale), with the clipping threshold and the share of steps it clipped."""
    steps, norms = _series(record.train_rows, "grad_norm")
    if not _has_values(norms):
        return None
    figure, axes = _axes("Gradient norm (before clipping)", "grad norm")
    axes.plot(steps, norms, color=TRAIN_COLOR, linewidth=1.3, label="grad norm")
    threshold = record.config.get("max_grad_norm")
    share = summary.clipped_share(record)
    if isinstance(threshold, (int, float)) and threshold > 0:
        label = f"max_grad_norm {threshold:g}" + (f": {share[0]:,} of {share[1]:,} steps clipped" if share else "")
        axes.axhline(threshold, color=EVAL_COLORS[0], linestyle="--", linewidth=1.1, label=label)
        axes.legend(fontsize=9)
    if all(value > 0 for value in norms if not math.isnan(value)):
        axes.set_yscale("log")
    return _png(figure)


def metric_plot(
    record: RunRecord, title: str, ylabel: str, keys: dict[str, str], log_scale: bool = False, from_zero: bool = False
) -> bytes | None:
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
    task = task_metric_plot(record)
    if task is not None:
        plots["Task metric"] = task
    world = record.run.get("world_size") or 1
    throughput = {"tokens_per_s": "all tokens", "trained_tokens_per_s": "trained tokens"}
    if world > 1:  # on one device the per-device curve is the all-tokens curve
        throughput["tokens_per_s_per_device"] = f"all tokens per device (÷{world})"
    small = {
        "Loss per source": source_loss_plot(record),
        "Mixture of trained tokens": mixture_plot(record),
        "Token accuracy": accuracy_plot(record),
        "Learning rate": metric_plot(record, "Learning rate", "lr", {"lr": "lr"}),
        "Gradient norm": grad_norm_plot(record),
        "Clipped steps": metric_plot(
            record,
            "Steps clipped by max_grad_norm (share per logged window)",
            "share of steps",
            {"clipped_fraction": "clipped"},
            from_zero=True,
        ),
        "Throughput": metric_plot(record, "Throughput", "tokens / s", throughput, from_zero=True),
        "Memory": metric_plot(record, "Peak memory", "GiB", {"memory_gb": "peak memory"}, from_zero=True),
    }
    plots.update({title: png for title, png in small.items() if png is not None})
    return plots
