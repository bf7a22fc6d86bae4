"""What a run writes besides checkpoints: the run directory, run.json, samples, the final weights."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape

from sftkit.config import SFTConfig
from sftkit.model.adapters import save_adapter
from sftkit.model.load import ModelError
from sftkit.train.metrics import MetricsWriter

if TYPE_CHECKING:
    from sftkit.train.setup import Run
    from sftkit.train.state import RunState

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
    model: Any,  # a peft or transformers model
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
    write_chat_template(final_dir, template)


def write_chat_template(directory: Path, template: str) -> None:
    """The template the run trains with, beside the run, each checkpoint and the final weights."""
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")


def write_run_info(run: Run, state: RunState, status: str, final_dir: Path | None = None) -> None:
    """run.json: the run's facts and where it stands (status: running | finished | stopped |
    early_stopped | crashed; `final_dir` once the final weights are written), replaced atomically."""
    if not run.main:
        return
    info = {
        "status": status,
        **run_facts(run),
        "last_step": state.step,
        "best_checkpoint": state.best_checkpoint,
        "best_metric": state.best_value,
        "final_dir": str(final_dir) if final_dir else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if final_dir else None,
    }
    temp = run.output_dir / ".run.json.tmp"
    temp.write_text(json.dumps(info, indent=2))
    temp.replace(run.output_dir / "run.json")


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


def run_facts(run: Run) -> dict[str, Any]:
    """What run.json says about the run besides where it stands."""
    config, data, model, world = run.config, run.data, run.model, run.world
    return {
        "model_name_or_path": config.model_name_or_path,
        "finetuning": config.finetuning,
        "world_size": world,
        "micro_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch": config.per_device_train_batch_size * config.gradient_accumulation_steps * world,
        "sequences": data.sequences,
        "steps_per_epoch": data.steps_per_epoch,
        "total_steps": data.total_steps,
        "streaming": config.streaming,
        "sources": data.feed.sources,
        "source_weights": [spec.weight for spec in config.datasets] if config.is_mixture else None,
        "warmup_steps": data.warmup_steps,
        "trainable_params": model.trainable,
        "total_params": model.total,
        "trained_token_fraction": run.stats["trained_token_fraction"],
        "packing": config.packing,
        "chunked_loss": model.chunked,
        "metric_for_best_model": config.best_model_metric,
        "started_at": run.started_at,
    }
