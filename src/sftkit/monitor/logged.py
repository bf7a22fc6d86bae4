"""Findings read from what a run logged as a whole, where a single step shows nothing: the report runs these
over metrics.jsonl (finished, running or crashed), beside the live detectors of diagnosis.py.

    kind                    fires when                                                    first thing to try
    clipped_steps           most steps had their gradient scaled down by max_grad_norm     raise it (or lower LR)
    source_memorised        a source the mixture repeats many times has a loss far below   lower its weight
                            the other sources'
    token_accuracy_gap      train token accuracy runs far ahead of eval token accuracy     fewer epochs, more data
    metric_loss_disagree    an eval set's task metric (`eval_<set>_<metric>`) and its       pick checkpoints by the
                            loss part ways: the metric falls from its best while the loss   task metric
                            keeps improving, or the loss rises from its best while the
                            metric keeps rising

Each reads the rows once: linear in logged rows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from sftkit.monitor.diagnosis import Finding

CLIPPED_SHARE = 0.5  # "most steps"
REPEATED = 3.0  # the mixture draws a source at least this many times as often as it occurs
COLLAPSED = 0.5  # its loss below this fraction of the other sources' (median)
ACCURACY_GAP = 0.15  # train token accuracy this far (absolute) above eval
LOSS_CHANGE = 0.02  # relative change of the eval loss that counts as a move
METRIC_CHANGE = 0.05  # relative change of a task metric that counts as a move
RECENT_ROWS = 3  # rows a "last" figure is the median of, so one noisy row does not decide
NOT_TASK_METRICS = ("loss", "token_accuracy")


@dataclass(frozen=True)
class SourceFacts:
    name: str
    repeat_rate: float  # trained tokens drawn per trained token it has, over one pass of the mixture


def logged_findings(
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    max_grad_norm: float,
    learning_rate: float | None,
    sources: list[SourceFacts],
) -> list[Finding]:
    """Every finding the logged rows support, in the order of the table above."""
    candidates = [
        clipped_steps(train_rows, max_grad_norm, learning_rate),
        source_memorised(train_rows, sources),
        token_accuracy_gap(train_rows, eval_rows),
        *metric_loss_disagree(eval_rows),
    ]
    return [finding for finding in candidates if finding is not None]


def _numbers(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]


def _recent(values: list[float]) -> float:
    return statistics.median(values[-RECENT_ROWS:])


def clipped_steps(rows: list[dict[str, Any]], max_grad_norm: float, learning_rate: float | None) -> Finding | None:
    if max_grad_norm <= 0 or not rows or not all(isinstance(row.get("clipped_steps"), int) for row in rows):
        return None
    clipped, steps = sum(row["clipped_steps"] for row in rows), rows[-1]["step"]
    if steps <= 0 or clipped / steps <= CLIPPED_SHARE:
        return None
    norms = sorted(_numbers(rows, "grad_norm"))
    median = statistics.median(norms) if norms else float("nan")
    suggested = norms[int(0.9 * (len(norms) - 1))] if norms else float("nan")
    lr = f" or lower learning_rate (now {learning_rate:g})" if learning_rate else ""
    return Finding(
        steps,
        "clipped_steps",
        f"{clipped} of {steps} steps ({clipped / steps:.0%}) were clipped by max_grad_norm = {max_grad_norm:g}; "
        f"the logged grad norms have a median of {median:.3g}",
        {"clipped_steps": clipped, "steps": steps, "max_grad_norm": max_grad_norm, "median_grad_norm": median},
        f"the clip, not the learning rate, sets the size of nearly every update: raise max_grad_norm to about "
        f"{suggested:.2g} (the 90th percentile of the logged grad norms){lr}",
    )


def source_memorised(rows: list[dict[str, Any]], sources: list[SourceFacts]) -> Finding | None:
    losses = {
        source.name: _numbers([row.get("source_loss") or {} for row in rows], source.name)
        for source in sources
        if any(isinstance(row.get("source_loss"), dict) for row in rows)
    }
    recent = {name: _recent(values) for name, values in losses.items() if values}
    if len(recent) < 2:
        return None
    for source in sorted(sources, key=lambda s: -s.repeat_rate):
        if source.repeat_rate < REPEATED or source.name not in recent:
            continue
        others = statistics.median(value for name, value in recent.items() if name != source.name)
        loss = recent[source.name]
        if loss > COLLAPSED * others:
            continue
        return Finding(
            rows[-1]["step"],
            "source_memorised",
            f"source '{source.name}' is drawn {source.repeat_rate:.1f}x as often as it occurs and its loss "
            f"({loss:.3g}) is {others / max(loss, 1e-12):.1f}x below the other sources' ({others:.3g}): the model is "
            "memorising it",
            {
                "source": source.name,
                "repeat_rate": source.repeat_rate,
                "source_loss": loss,
                "other_sources_loss": others,
            },
            f"lower the weight of '{source.name}' (or add data to it) so it repeats fewer times; its low loss is "
            "repetition, not skill",
        )
    return None


def token_accuracy_gap(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> Finding | None:
    train = _numbers(train_rows, "token_accuracy")
    keys = list(dict.fromkeys(key for row in eval_rows for key in row if key.endswith("token_accuracy")))
    if not train or not keys:
        return None
    key = keys[0]
    evals = _numbers(eval_rows, key)
    if not evals:
        return None
    train_now, eval_now = _recent(train), evals[-1]
    if train_now - eval_now < ACCURACY_GAP:
        return None
    return Finding(
        eval_rows[-1]["step"],
        "token_accuracy_gap",
        f"train token accuracy {train_now:.1%} runs {100 * (train_now - eval_now):.0f} points ahead of "
        f"{key.replace('_', ' ')} {eval_now:.1%}",
        {"train_token_accuracy": train_now, key: eval_now},
        "the model fits the training rows far better than held-out ones: train fewer epochs, lower the learning "
        "rate or add data, and keep the checkpoint with the best eval loss",
    )


def metric_loss_disagree(eval_rows: list[dict[str, Any]]) -> list[Finding]:
    """One finding per eval set whose task metric (`eval_<set>_<metric>`, higher is better) and loss
    (`eval_<set>_loss`) part ways: the metric fell from its best eval while the loss went on improving, or the
    loss rose from its best while the metric went on rising.

    Each is measured from that best eval to the median of the (up to RECENT_ROWS) evals after it, not from the
    first eval to the last: a fine-tuned metric starts near the base's, so a metric that climbs, peaks and
    falls back still ends above where it started, and a first-to-last comparison would call that agreement."""
    loss_keys = list(
        dict.fromkeys(key for row in eval_rows for key in row if key.startswith("eval_") and key.endswith("_loss"))
    )
    prefixes = [key.removesuffix("loss") for key in loss_keys]  # "eval_gsm8k_", or "eval_" for an unnamed set
    findings = []
    for loss_key, prefix in zip(loss_keys, prefixes, strict=True):
        longer = [other for other in prefixes if other != prefix and other.startswith(prefix)]  # other sets' keys
        metric_keys = [
            key
            for key in dict.fromkeys(key for row in eval_rows for key in row)
            if key.startswith(prefix)
            and key.removeprefix(prefix) not in NOT_TASK_METRICS
            and not key.endswith("token_accuracy")
            and not any(key.startswith(other) for other in longer)
        ]
        for metric_key in metric_keys:
            rows = [row for row in eval_rows if _finite(row.get(loss_key)) and _finite(row.get(metric_key))]
            finding = _parted(rows, loss_key, metric_key, from_best_metric=True) or _parted(
                rows, loss_key, metric_key, from_best_metric=False
            )
            if finding is not None:
                findings.append(finding)
    return findings


def _parted(rows: list[dict[str, Any]], loss_key: str, metric_key: str, from_best_metric: bool) -> Finding | None:
    """From the best metric: did the metric fall while the loss fell too? From the best (lowest) loss: did the
    loss rise while the metric rose too? Each against the median of the (up to RECENT_ROWS) evals after it."""
    if from_best_metric:
        best = max(range(len(rows)), key=lambda i: rows[i][metric_key], default=0)
    else:
        best = min(range(len(rows)), key=lambda i: rows[i][loss_key], default=0)
    later = rows[best + 1 :][-RECENT_ROWS:]
    if not later:
        return None
    anchor = rows[best]
    metric_now = statistics.median(row[metric_key] for row in later)
    loss_now = statistics.median(row[loss_key] for row in later)
    sign = -1 if from_best_metric else 1  # both fell, or both rose
    if sign * _change(anchor[metric_key], metric_now) < METRIC_CHANGE or (
        sign * _change(anchor[loss_key], loss_now) < LOSS_CHANGE
    ):
        return None
    at, last = f"at step {anchor['step']}", f"by step {rows[-1]['step']}"
    pick = f"pick checkpoints by the metric (metric_for_best_model: {metric_key}"
    if from_best_metric:
        message = (
            f"{metric_key} fell from its best, {anchor[metric_key]:.4g} {at}, to {metric_now:.4g} {last} while "
            f"{loss_key} kept improving ({anchor[loss_key]:.4g} -> {loss_now:.4g})"
        )
        advice = (
            f"the loss is not measuring the task: {pick}, which keeps step {anchor['step']}'s) and read the "
            "samples; a falling loss with a falling metric often means answers that run on or loop"
        )
    else:
        message = (
            f"{loss_key} rose from its best, {anchor[loss_key]:.4g} {at}, to {loss_now:.4g} {last} while "
            f"{metric_key} kept rising ({anchor[metric_key]:.4g} -> {metric_now:.4g})"
        )
        advice = (
            f"the loss is not measuring the task: {pick}); a rising loss with a rising metric usually means "
            "growing confidence where the model is wrong, not worse answers"
        )
    evidence = {
        "loss_key": loss_key,
        "metric_key": metric_key,
        "best_step": anchor["step"],
        "last_step": rows[-1]["step"],
    }
    return Finding(rows[-1]["step"], "metric_loss_disagree", message, evidence, advice)


def _change(before: float, after: float) -> float:
    return (after - before) / max(abs(before), 1e-12)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
