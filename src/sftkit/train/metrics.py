"""Metric rows: sums over a logging window of steps, written to OUTPUT_DIR/metrics.jsonl and the sinks of
`report_to`."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from sftkit.train.sinks import flat_scalars, open_sinks


def memory_gb() -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_after(path: Path, step: int) -> None:
    """Drop rows logged after `step`: a resumed run rewrites them, so the log matches an uninterrupted run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


class MetricsWriter:
    """Appends rows to metrics.jsonl (flushed per row, so a crash keeps them) and mirrors their numbers to the sinks."""

    def __init__(self, output_dir: Path, sinks: list[str], run_name: str, config: dict[str, Any]):
        self.path = output_dir / "metrics.jsonl"
        self.sinks = open_sinks(sinks, output_dir, run_name, config)

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_finite_or_none(row)) + "\n")
        scalars = flat_scalars({k: v for k, v in row.items() if k != "step"})
        for sink in self.sinks:
            sink.log(scalars, row["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        for sink in self.sinks:
            sink.text(tag, text, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _finite_or_none(value: Any) -> Any:
    """NaN and inf as null (JSON has neither), in nested dicts too."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def empty_window() -> dict[str, float]:
    """Sums over the optimizer steps since the last logged row (saved in checkpoints, so a resumed run logs
    the same rows), and the wall-clock time the window started."""
    return {"loss_sum": 0.0, "trained": 0, "correct": 0, "tokens": 0, "steps": 0, "clipped": 0, "time": time.time()}


def accumulate(
    window: dict[str, float], loss_sum: float, trained: int, tokens: int, correct: int, clipped: bool
) -> None:
    """Add one optimizer step: its summed loss and argmax hits over `trained` targets, and whether
    `max_grad_norm` scaled its gradients down."""
    window["loss_sum"] += loss_sum
    window["trained"] += trained
    window["tokens"] += tokens
    window["correct"] = window.get("correct", 0) + correct  # .get: windows saved before these sums existed
    window["clipped"] = window.get("clipped", 0) + int(clipped)
    window["steps"] += 1


def accumulate_sources(window: dict[str, Any], loss_sums: list[float], trained: list[int]) -> None:
    """Add one optimizer step's summed loss and trained targets of each training source (all processes)."""
    for key, values in (("source_loss_sum", loss_sums), ("source_trained", trained)):
        window[key] = [total + value for total, value in zip(window.get(key) or [0] * len(values), values, strict=True)]


def source_figures(window: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """The row's figures per training source, by name, over the window.

    `source_trained_tokens` names every source (0 when the window drew none of it: the report adds
    these up into the realised mixture); `source_loss` (summed loss / trained tokens) only the sources
    that had trained tokens in the window, since an empty source has no loss.
    """
    trained = window.get("source_trained") or [0] * len(names)
    losses = window.get("source_loss_sum") or [0.0] * len(names)
    return {
        "source_trained_tokens": {name: int(count) for name, count in zip(names, trained, strict=True)},
        "source_loss": {name: loss / count for name, loss, count in zip(names, losses, trained, strict=True) if count},
    }


def window_row(
    window: dict[str, float], step: int, epoch: float, lr: float, grad_norm: float, elapsed: float, devices: int
) -> dict[str, Any]:
    """One metrics row. Loss and token accuracy are means over the window's trained tokens (not means
    of per-step means), so they do not depend on how the steps' tokens are split into micro-batches."""
    seconds = max(time.time() - window["time"], 1e-9)
    trained, steps = max(window["trained"], 1), max(window["steps"], 1)
    return {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": window["loss_sum"] / trained,
        "token_accuracy": window["correct"] / trained,
        "lr": lr,
        "grad_norm": grad_norm,
        "clipped_steps": window["clipped"],
        "clipped_fraction": window["clipped"] / steps,
        "trained_tokens": window["trained"],
        "tokens": window["tokens"],
        "trained_tokens_per_s": window["trained"] / seconds,
        "tokens_per_s": window["tokens"] / seconds,
        "tokens_per_s_per_device": window["tokens"] / seconds / devices,
        "elapsed_s": round(elapsed, 2),
        "memory_gb": round(memory_gb(), 3),
    }
