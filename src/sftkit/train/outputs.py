"""What a run writes besides checkpoints: the run directory, run.json, samples, the final weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from sftkit.config import SFTConfig
from sftkit.model.adapters import save_adapter
from sftkit.model.load import ModelError
from sftkit.train.metrics import MetricsWriter

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "diagnosis.jsonl", "run.json", "data_stats.json", "report.html")


def prepare_output_dir(output_dir: Path, config: SFTConfig) -> None:
    """Refuse to mix two runs in one directory unless the user resumes or overwrites."""
    holds_run = any((output_dir / name).exists() for name in ("run.json", "metrics.jsonl")) or any(
        output_dir.glob("checkpoint-*")
    )
    if holds_run and not config.resume_from_checkpoint:
        if not config.overwrite_output_dir:
            raise ModelError(
                f"output_dir {output_dir} already holds a run; set `resume_from_checkpoint: true` to "
                "continue it, `overwrite_output_dir: true` to replace it, or choose another output_dir"
            )
        for name in RUN_FILES:
            (output_dir / name).unlink(missing_ok=True)
        for path in [
            *output_dir.glob("checkpoint-*"),
            *output_dir.glob(".tmp-checkpoint-*"),
            output_dir / "adapter",
            output_dir / "model",
            output_dir / "tensorboard",
        ]:
            shutil.rmtree(path, ignore_errors=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ModelError(
            f"output_dir {output_dir}: cannot write there ({err.strerror}); choose a writable directory"
        ) from None


def save_final(
    model: torch.nn.Module,
    tokenizer: Any,
    template: str,
    final_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    initial_adapter: dict[str, torch.Tensor] | None = None,
) -> None:
    """The final weights with the tokenizer whose chat template is the one trained with; an adapter is
    written against the original base even when its init changed the base (see `save_adapter`)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    if hasattr(model, "peft_config"):
        save_adapter(model, final_dir, initial_adapter, state_dict)
    else:
        model.save_pretrained(final_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(final_dir)
    (final_dir / "chat_template.jinja").write_text(template, encoding="utf-8")


def write_run_info(output_dir: Path, info: dict[str, Any], main: bool) -> None:
    if main:
        temp = output_dir / ".run.json.tmp"
        temp.write_text(json.dumps(info, indent=2))
        temp.replace(output_dir / "run.json")


def log_samples(
    output_dir: Path, writer: MetricsWriter | None, step: int, samples: list[dict], console: Console
) -> None:
    with (output_dir / "samples.jsonl").open("a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"step": step, **sample}) + "\n")
    text = "\n\n".join(f"**{s['prompt']}**\n\n{s['completion']}" for s in samples)
    if writer:
        writer.text("samples", text, step)
    first = samples[0] if samples else None
    if first:
        console.print(
            f"[dim]sample @ {step}:[/dim] {escape(repr(first['prompt'][:60]))} → "
            f"{escape(repr(first['completion'][:120]))}",
            highlight=False,
        )
