"""Findings read from what a run logged as a whole, where a single step shows nothing: the report runs these
over metrics.jsonl (finished, running or crashed), beside the live detectors of diagnosis.py.

    kind                    fires when                                                    first thing to try
    clipped_steps           most steps had their gradient scaled down by max_grad_norm     raise it (or lower LR)
    source_memorised        a source the mixture repeats many times has a loss far below   lower its weight
                            the other sources'
    token_accuracy_gap      train token accuracy runs far ahead of eval token accuracy     fewer epochs, more data
    metric_loss_disagree    an eval set's task metric (`eval_<set>_<metric>`) and its       pick checkpoints by the
                            loss move the same way: the loss improves while the metric      task metric
                            falls, or the reverse

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
    (`eval_<set>_loss`) moved the same way between the first and the last eval."""
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
            if len(rows) < 2:
                continue
            first, last = rows[0], rows[-1]
            loss_change = (last[loss_key] - first[loss_key]) / max(abs(first[loss_key]), 1e-12)
            metric_change = (last[metric_key] - first[metric_key]) / max(abs(first[metric_key]), 1e-12)
            if abs(loss_change) < LOSS_CHANGE or abs(metric_change) < METRIC_CHANGE:
                continue
            if (loss_change < 0) != (metric_change < 0):
                continue  # loss falls as the metric rises (or the reverse): they agree
            direction = "improved" if loss_change < 0 else "worsened"
            findings.append(
                Finding(
                    last["step"],
                    "metric_loss_disagree",
                    f"{loss_key} {direction} ({first[loss_key]:.4g} -> {last[loss_key]:.4g}) from step {first['step']} "
                    f"to {last['step']} while {metric_key} went {'down' if metric_change < 0 else 'up'} "
                    f"({first[metric_key]:.4g} -> {last[metric_key]:.4g})",
                    {
                        "loss_key": loss_key,
                        "metric_key": metric_key,
                        "first_step": first["step"],
                        "last_step": last["step"],
                    },
                    f"the loss is not measuring the task: pick checkpoints by the metric (metric_for_best_model: "
                    f"{metric_key}) and read the samples; a falling loss with a falling metric often means "
                    "longer or looping answers",
                )
            )
    return findings


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
