"""What the report says about a run, as plain (label, text) rows shared by the HTML page and the console."""

from __future__ import annotations

import math
import statistics
from typing import Any

from sftkit.config import eval_loss_key, greater_is_better
from sftkit.report.read import RunRecord, eval_loss_keys

CONFIG_KEYS = (
    "model_name_or_path",
    "finetuning",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "packing",
    "assistant_only_loss",
    "chat_template",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "max_grad_norm",
    "metric_for_best_model",
    "seed",
)
LORA_ONLY = ("lora_r", "lora_alpha", "lora_target_modules")
DATA_KEYS = {
    "train_examples": "train examples",
    "eval_examples": "eval examples",
    "total_tokens": "tokens",
    "trained_tokens": "trained tokens",
    "trained_token_fraction": "trained token fraction",
    "truncated_examples": "truncated examples",
    "skipped_rows": "skipped rows",
    "packing_efficiency": "packing efficiency",
    "packed_sequences": "packed sequences",
}
RUN_KEYS = {
    "world_size": "processes",
    "effective_batch": "effective batch (sequences)",
    "steps_per_epoch": "steps per epoch",
    "total_steps": "total steps",
    "warmup_steps": "warmup steps",
    "trainable_params": "trainable parameters",
    "total_params": "total parameters",
}


def fmt(value: Any, key: str = "") -> str:
    """Numbers for people: 12,345 · 0.0002 · 1.234 · 37.5% for fractions."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key.endswith(("_fraction", "_efficiency", "_waste")):
            return f"{value:.1%}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(fmt(item) for item in value)
    if isinstance(value, dict):  # e.g. skipped rows per reason
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


def config_rows(record: RunRecord) -> list[tuple[str, str]]:
    config = record.config
    rows = []
    for key in CONFIG_KEYS:
        if key not in config or config[key] is None:
            continue
        if key in LORA_ONLY and config.get("finetuning") == "full":
            continue
        if (key == "max_steps" and config[key] <= 0) or (key == "num_train_epochs" and config.get("max_steps", -1) > 0):
            continue  # only the one of the two that decides the run's length
        rows.append((key, fmt(config[key], key)))
    datasets = [spec.get("path", "?") for spec in config.get("datasets", []) if isinstance(spec, dict)]
    if datasets:
        rows.append(("datasets", ", ".join(datasets)))
    return rows


def data_rows(record: RunRecord) -> list[tuple[str, str]]:
    stats = record.data_stats
    rows = [(label, fmt(stats[key], key)) for key, label in DATA_KEYS.items() if key in stats]
    lengths = stats.get("example_tokens")
    if isinstance(lengths, dict):
        rows.append(
            ("example tokens (median/p95/max)", " / ".join(fmt(lengths.get(k)) for k in ("median", "p95", "max")))
        )
    return rows


def schedule_rows(record: RunRecord) -> list[tuple[str, str]]:
    return [(label, fmt(record.run[key], key)) for key, label in RUN_KEYS.items() if key in record.run]


def fact_sections(record: RunRecord) -> list[tuple[str, list[tuple[str, str]]]]:
    sections = [
        ("Config", config_rows(record)),
        ("Data", data_rows(record)),
        ("Batch and schedule", schedule_rows(record)),
    ]
    sources = source_rows(record)
    return [*sections, ("Training sources", sources)] if sources else sections


def source_names(record: RunRecord) -> list[str]:
    """The run's training sources: run.json's `sources`, else the names its rows carry."""
    names = record.run.get("sources")
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    seen: dict[str, None] = {}
    for row in record.train_rows:
        if isinstance(row.get("source_trained_tokens"), dict):
            seen.update(dict.fromkeys(row["source_trained_tokens"]))
    return list(seen)


def target_shares(record: RunRecord) -> dict[str, float] | None:
    """Each source's target share of trained tokens (run.json's `source_weights`, normalised); None
    when the sources were concatenated rather than mixed."""
    names, weights = source_names(record), record.run.get("source_weights")
    if (
        not isinstance(weights, list)
        or len(weights) != len(names)
        or not all(isinstance(weight, (int, float)) and weight > 0 for weight in weights)
    ):
        return None
    return {name: weight / sum(weights) for name, weight in zip(names, weights, strict=True)}


def realised_mixture(record: RunRecord) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, per source its share of all trained tokens up to each step): running sums of the rows'
    `source_trained_tokens`, which cover every step since each row sums its logging window. Linear in rows."""
    names = source_names(record)
    totals = dict.fromkeys(names, 0)
    steps: list[int] = []
    shares: dict[str, list[float]] = {name: [] for name in names}
    for row in record.train_rows:
        counts = row.get("source_trained_tokens")
        if not isinstance(counts, dict):
            continue
        for name in names:
            totals[name] += counts.get(name) or 0
        trained = sum(totals.values())
        if trained:
            steps.append(row["step"])
            for name in names:
                shares[name].append(totals[name] / trained)
    return steps, shares


def source_rows(record: RunRecord) -> list[tuple[str, str]]:
    """Per training source: its share of the trained tokens (and the target), and its last logged loss;
    nothing for a run with one source."""
    names = source_names(record)
    steps, shares = realised_mixture(record)
    if len(names) < 2 or not steps:
        return []
    targets = target_shares(record) or {}
    rows = []
    for name in names:
        text = f"{shares[name][-1]:.1%} of trained tokens"
        if name in targets:
            text += f" (target {targets[name]:.1%})"
        losses = [row["source_loss"].get(name) for row in record.train_rows if isinstance(row.get("source_loss"), dict)]
        losses = [loss for loss in losses if isinstance(loss, (int, float))]
        if losses:
            text += f" · last loss {fmt(float(losses[-1]))}"
        rows.append((name, text))
    return rows


def headline_rows(record: RunRecord) -> list[tuple[str, str]]:
    """The few figures a reader wants first."""
    run, rows = record.run, []
    total = run.get("total_steps")
    rows.append(("status", record.status))
    rows.append(("step", f"{fmt(record.last_step)} / {fmt(total)}" if total else fmt(record.last_step)))
    losses = [row["loss"] for row in record.train_rows if isinstance(row.get("loss"), (int, float))]
    if losses:
        rows.append(("last train loss", fmt(float(losses[-1]))))
    best = best_eval(record)
    if best:
        rows.append((f"best {words(best[0])}", f"{fmt(best[2])} at step {fmt(best[1])}"))
    accuracy = _last(record.train_rows, "token_accuracy")
    if accuracy is not None:
        eval_key = eval_loss_key(best[0] if best else "eval_loss").removesuffix("_loss")
        eval_accuracy = _last(record.eval_rows, f"{eval_key}_token_accuracy")
        rows.append(
            (
                "last token accuracy",
                f"train {accuracy:.1%}"
                + (f" · {words(eval_key)} {eval_accuracy:.1%}" if eval_accuracy is not None else ""),
            )
        )
    per_device = [
        row["tokens_per_s_per_device"]
        for row in record.train_rows
        if isinstance(row.get("tokens_per_s_per_device"), (int, float))
    ]
    if per_device:
        rows.append(("tokens/s per device (median)", f"{statistics.median(per_device):,.0f}"))
    share = clipped_share(record)
    if share and (record.config.get("max_grad_norm") or 0) > 0:
        rows.append(("steps clipped", f"{share[0]:,} / {share[1]:,} ({share[0] / max(share[1], 1):.1%})"))
    if record.train_rows and isinstance(record.train_rows[-1].get("elapsed_s"), (int, float)):
        rows.append(("elapsed", _duration(record.train_rows[-1]["elapsed_s"])))
    rows.append(("findings", fmt(len(record.findings))))
    return rows


def best_eval(record: RunRecord) -> tuple[str, int, float] | None:
    """(metric, step, value) of the best eval by the run's metric_for_best_model (default: the first eval loss)."""
    keys = eval_loss_keys(record.eval_rows)
    metric = record.run.get("metric_for_best_model") or (keys[0] if keys else None)
    if metric is None:  # no eval logged
        return None
    evals = [
        (row["step"], float(row[metric]))
        for row in record.eval_rows
        if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])
    ]
    if not evals:
        return None
    step, value = (max if greater_is_better(metric) else min)(evals, key=lambda pair: pair[1])
    return metric, step, value


def clipped_share(record: RunRecord) -> tuple[int, int] | None:
    """(steps clipped by max_grad_norm, steps) over the logged run; None when the rows do not count clipping."""
    rows = record.train_rows
    if not rows or not all(isinstance(row.get("clipped_steps"), int) for row in rows):
        return None
    return sum(row["clipped_steps"] for row in rows), rows[-1]["step"]


def checkpoint_rows(record: RunRecord) -> list[dict[str, str]]:
    """Checkpoints on disk plus the final weights, each with what it is (best, final, incomplete)."""
    best_name = str(record.run.get("best_checkpoint") or "").rstrip("/").rsplit("/", 1)[-1]
    rows = []
    for checkpoint in record.checkpoints:
        marks = []
        if checkpoint.name == best_name:
            metric = record.run.get("metric_for_best_model") or "eval_loss"
            marks.append(f"best {words(metric)} {fmt(record.run.get('best_metric', record.run.get('best_eval_loss')))}")
        if not checkpoint.complete:
            marks.append("incomplete: no manifest.json")
        rows.append({"name": checkpoint.name, "step": fmt(checkpoint.step), "note": "; ".join(marks)})
    for final in ("adapter", "model"):
        if (record.run_dir / final).is_dir():
            rows.append({"name": f"{final}/", "step": fmt(record.run.get("last_step")), "note": "final weights"})
    return rows


def samples_by_prompt(record: RunRecord) -> dict[str, list[dict[str, Any]]]:
    """prompt → its generations in step order, so a reader follows one prompt through training."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for sample in sorted(record.samples, key=lambda s: s["step"]):
        grouped.setdefault(str(sample.get("prompt", "")), []).append(sample)
    return grouped


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return float(values[-1]) if values else None


def words(key: str) -> str:
    """eval_gsm8k_loss → "eval gsm8k loss"."""
    return key.replace("_", " ")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
