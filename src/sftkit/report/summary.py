"""What the report says about a run, as plain (label, text) rows shared by the HTML page and the console."""

from __future__ import annotations

import math
from typing import Any

from sftkit.report.read import RunRecord

CONFIG_KEYS = ("model_name_or_path", "finetuning", "lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
               "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
               "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "packing",
               "assistant_only_loss", "chat_template", "bf16", "fp16", "gradient_checkpointing", "seed")
LORA_ONLY = ("lora_r", "lora_alpha", "lora_target_modules")
DATA_KEYS = {"train_examples": "train examples", "eval_examples": "eval examples", "total_tokens": "tokens",
             "trained_tokens": "trained tokens", "trained_token_fraction": "trained token fraction",
             "truncated_examples": "truncated examples", "skipped_rows": "skipped rows",
             "packing_efficiency": "packing efficiency", "packed_sequences": "packed sequences"}
RUN_KEYS = {"world_size": "processes", "effective_batch": "effective batch (sequences)",
            "steps_per_epoch": "steps per epoch", "total_steps": "total steps", "warmup_steps": "warmup steps",
            "trainable_params": "trainable parameters", "total_params": "total parameters"}


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
        rows.append(("example tokens (median/p95/max)",
                     " / ".join(fmt(lengths.get(k)) for k in ("median", "p95", "max"))))
    return rows


def schedule_rows(record: RunRecord) -> list[tuple[str, str]]:
    return [(label, fmt(record.run[key], key)) for key, label in RUN_KEYS.items() if key in record.run]


def fact_sections(record: RunRecord) -> list[tuple[str, list[tuple[str, str]]]]:
    return [("Config", config_rows(record)), ("Data", data_rows(record)),
            ("Batch and schedule", schedule_rows(record))]


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
        rows.append(("best eval loss", f"{fmt(best[1])} at step {fmt(best[0])}"))
    if record.train_rows and isinstance(record.train_rows[-1].get("elapsed_s"), (int, float)):
        rows.append(("elapsed", _duration(record.train_rows[-1]["elapsed_s"])))
    rows.append(("findings", fmt(len(record.findings))))
    return rows


def best_eval(record: RunRecord) -> tuple[int, float] | None:
    evals = [(row["step"], float(row["eval_loss"])) for row in record.eval_rows
             if isinstance(row.get("eval_loss"), (int, float)) and math.isfinite(row["eval_loss"])]
    return min(evals, key=lambda pair: pair[1]) if evals else None


def checkpoint_rows(record: RunRecord) -> list[dict[str, str]]:
    """Checkpoints on disk plus the final weights, each with what it is (best, final, incomplete)."""
    best_name = str(record.run.get("best_checkpoint") or "").rstrip("/").rsplit("/", 1)[-1]
    rows = []
    for checkpoint in record.checkpoints:
        marks = []
        if checkpoint.name == best_name:
            marks.append(f"best eval loss {fmt(record.run.get('best_eval_loss'))}")
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


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
