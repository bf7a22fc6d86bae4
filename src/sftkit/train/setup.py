"""Setting a run up from its config, in named parts that return one `Run`:

    _setup_output_dir   hardware checks, sinks installed, the run directory claimed, the seed set
    _setup_data         tokenizer and template → RunData: the feed of training steps, the eval sets
    _setup_model        RunModel: weights, adapters, loss module, optimizer, schedule
    _setup_records      config.yaml, chat_template.jinja, data_stats.json, metrics writer, monitor, samples

The config is read here and nowhere below: each part passes typed values on. Cost: what data and
model loading cost (tokenizing grows with the dataset unless streaming; see run_data.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape

from sftkit.config import SFTConfig, redacted, save_config
from sftkit.data.template import resolve_chat_template
from sftkit.model.load import ModelError, load_tokenizer
from sftkit.model.quantize import check_qlora_supported
from sftkit.monitor.diagnosis import Finding, Monitor, MonitorSettings
from sftkit.monitor.samples import load_sample_prompts
from sftkit.train.distributed import is_sharded, make_accelerator, require_shared_output_dir
from sftkit.train.metrics import MetricsWriter
from sftkit.train.outputs import prepare_output_dir, write_chat_template
from sftkit.train.run_data import RunData, load_run_data
from sftkit.train.run_model import RunModel, load_run_model
from sftkit.train.schedule import lr_multiplier
from sftkit.train.sinks import check_installed
from sftkit.train.task_eval import TaskEval, load_task_eval


@dataclass
class Run:
    """Everything a run trains with, set up once; what changes as it trains is its `RunState`."""

    config: SFTConfig
    accelerator: Accelerator
    console: Console
    output_dir: Path
    tokenizer: Any
    template: str
    data: RunData
    model: RunModel
    stats: dict[str, Any]  # data_stats.json
    sample_prompts: list[list[dict]]  # conversations completed every `sample_steps` (main process, unsharded models)
    task_eval: TaskEval | None = None  # eval_metric: what each eval set generates and how it is scored
    writer: MetricsWriter | None = None  # main process only
    monitor: Monitor | None = None  # main process only
    started_at: str = ""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def can_sample(self) -> bool:
        """Samples run on the main process alone, which a sharded (FSDP/DeepSpeed) model cannot do."""
        return bool(self.sample_prompts) and not is_sharded(self.accelerator)

    def say(self, *args: Any, **kwargs: Any) -> None:
        """Print on the main process only."""
        if self.main:
            self.console.print(*args, **kwargs)

    def tell(self, findings: list[Finding]) -> None:
        for finding in findings:  # model text may hold [brackets]: never read as markup
            self.say(f"[bold yellow]diagnosis:[/bold yellow] {escape(finding.message)} — {escape(finding.advice)}")


def setup(config: SFTConfig, console: Console) -> Run:
    accelerator = make_accelerator(
        "bf16" if config.bf16 else "fp16" if config.fp16 else "no",
        config.per_device_train_batch_size,
        config.max_grad_norm,
    )
    main = accelerator.is_main_process

    def say(text: str) -> None:
        if main:
            console.print(text)

    _setup_output_dir(config, accelerator, say)
    tokenizer = load_tokenizer(config.tokenizer_source, config.trust_remote_code)
    template = resolve_chat_template(config.chat_template, tokenizer)
    data = _setup_data(config, tokenizer, template, accelerator, say)
    model = _setup_model(config, tokenizer, template, accelerator, data, say)
    stats = data.stats(config.max_seq_length, config.per_device_train_batch_size, config.packing)
    prompts = load_sample_prompts(config.sample_prompts, data.prepared.sample_conversations, count=4)
    task_eval = load_task_eval(config, data.prepared, is_sharded(accelerator))
    run = Run(
        config,
        accelerator,
        console,
        Path(config.output_dir),
        tokenizer,
        template,
        data,
        model,
        stats,
        prompts,
        task_eval,
    )
    run.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if main:
        _setup_records(run)
    return run


def _setup_output_dir(config: SFTConfig, accelerator: Accelerator, say: Callable[[str], None]) -> None:
    note = check_hardware(config)
    if note:
        say(f"[yellow]{escape(note)}[/yellow]")
    check_installed(config.report_sinks)  # a missing tracker fails before data and model are loaded
    if accelerator.is_main_process:
        prepare_output_dir(Path(config.output_dir), config)
    require_shared_output_dir(accelerator, Path(config.output_dir))  # several machines: one output_dir they all see
    set_seed(config.seed)


def _setup_data(
    config: SFTConfig, tokenizer: Any, template: str, accelerator: Accelerator, say: Callable[[str], None]
) -> RunData:
    """Tokenized, masked, packed; the feed says which examples each step trains on."""
    data = load_run_data(config, tokenizer, template, accelerator, tell=lambda text: say(escape(text)))
    held_back = data.prepared.held_back
    if held_back is not None:
        say(
            f"No eval data: the last {len(held_back)} training rows are held back, and their prompts sampled every "
            f"{config.sample_steps or config.logging_steps * 10} steps (sample_holdout: 0 trains on them)"
        )
    return data


def _setup_model(
    config: SFTConfig,
    tokenizer: Any,
    template: str,
    accelerator: Accelerator,
    data: RunData,
    say: Callable[[str], None],
) -> RunModel:
    model = load_run_model(config, tokenizer, template, accelerator, data, tell=say)
    if model.token_ids:
        names = tokenizer.convert_ids_to_tokens(list(model.token_ids))
        say(f"Trainable token rows (embedding and output head): {escape(', '.join(names))}")
    return model


def _setup_records(run: Run) -> None:
    """What the main process writes about the run before its first step, and what it logs with."""
    config, output_dir = run.config, run.output_dir
    save_config(config, output_dir / "config.yaml")
    write_chat_template(output_dir, run.template)
    (output_dir / "data_stats.json").write_text(json.dumps(run.stats, indent=2))
    run.writer = MetricsWriter(output_dir, config.report_sinks, output_dir.name, redacted(config))
    total, warmup = run.data.total_steps, run.data.warmup_steps
    run.monitor = Monitor(
        MonitorSettings(
            learning_rate=config.learning_rate,
            total_steps=total,
            warmup_steps=warmup,
            expected_lr=lambda s: (
                config.learning_rate
                * lr_multiplier(s - 1, total, warmup, config.lr_scheduler_type, config.min_lr_ratio)
            ),
            trained_token_fraction=run.stats["trained_token_fraction"],
            precision="bf16" if config.bf16 else "fp16" if config.fp16 else "fp32",
        ),
        output_dir / "diagnosis.jsonl",
    )


def check_hardware(config: SFTConfig) -> str | None:
    """Settings the hardware cannot honour fail before any model is loaded; returns a note on what it
    can honour only slowly (QLoRA on CPU)."""
    if config.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ModelError("bf16 = true but this GPU has no bfloat16 support (pre-Ampere); use fp16: true")
    if config.fp16 and not torch.cuda.is_available():
        raise ModelError(
            "fp16 = true needs a CUDA GPU (fp16 autocast with loss scaling); on CPU use bf16: true or neither"
        )
    return check_qlora_supported(torch.cuda.is_available()) if config.finetuning == "qlora" else None
