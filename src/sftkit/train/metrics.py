"""Metric sinks: OUTPUT_DIR/metrics.jsonl always, TensorBoard and W&B when asked for."""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch


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
    """Appends rows to metrics.jsonl (flushed per row, so a crash keeps them) and mirrors to sinks."""

    def __init__(self, output_dir: Path, sinks: list[str], run_name: str, config: dict[str, Any]):
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if "wandb" in sinks:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError("report_to includes 'wandb' but wandb is not installed; pip install wandb")
            import wandb

            self.wandb = wandb.init(name=run_name, config=config, dir=str(output_dir))

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            group = "eval" if key.startswith("eval_") else "train"
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"{group}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text(tag, text, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def empty_window() -> dict[str, float]:
    return {"loss_sum": 0.0, "trained": 0, "tokens": 0, "steps": 0, "time": time.time()}


def accumulate(window: dict[str, float], loss_sum: float, trained: int, tokens: int) -> None:
    window["loss_sum"] += loss_sum
    window["trained"] += trained
    window["tokens"] += tokens
    window["steps"] += 1


def window_row(window: dict[str, float], step: int, epoch: float, lr: float, grad_norm: float,
               elapsed: float, memory: float) -> dict[str, Any]:
    seconds = max(time.time() - window["time"], 1e-9)
    return {"step": step, "epoch": round(epoch, 4), "loss": window["loss_sum"] / max(window["trained"], 1),
            "lr": lr, "grad_norm": grad_norm, "trained_tokens": window["trained"], "tokens": window["tokens"],
            "trained_tokens_per_s": window["trained"] / seconds, "tokens_per_s": window["tokens"] / seconds,
            "elapsed_s": round(elapsed, 2), "memory_gb": round(memory, 3)}
