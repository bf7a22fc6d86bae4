"""`sftkit demo`: the whole pipeline in a few minutes on a laptop CPU, with nothing to download.

    1. the task        unit conversions, asked for in English (task.py)
    2. a base model    a tiny Llama and its tokenizer built here, pre-trained on raw text with
                       `sftkit train` (pretrain.yaml): it knows the conversions, but no chat format
    3. the data        what `sftkit data inspect` shows for the fine-tuning set
    4. the plan        what `sftkit plan` says about the fine-tuning run
    5. before          exact match of the base model on held-out questions: about zero
    6. fine-tuning     `sftkit train demo.yaml`: LoRA, packing, eval, samples, diagnosis
    7. after           exact match of base + adapter on the same questions, and the report

Everything goes under OUTPUT_DIR (runs/demo by default):

    data/  init/  pretrain/ (run; base model in pretrain/model)  sft/ (run; adapter in sft/adapter, report.html)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sftkit.config import SFTConfig, load_config
from sftkit.demo.accuracy import Score, score
from sftkit.demo.base import ModelSize, build_model, build_tokenizer
from sftkit.demo.task import TaskData, make_task, write_task

SEED = 0


@dataclass(frozen=True)
class DemoSettings:
    pretrain_rows: int  # text rows of FACTS_PER_TEXT_ROW facts each
    pretrain_steps: int
    pretrain_batch_size: int
    sft_rows: int
    sft_steps: int
    eval_rows: int
    test_rows: int
    model: ModelSize = field(default_factory=ModelSize)


FULL = DemoSettings(
    pretrain_rows=6000,
    pretrain_steps=300,
    pretrain_batch_size=16,
    sft_rows=2000,
    sft_steps=80,
    eval_rows=64,
    test_rows=200,
)
# --quick: a two-layer model and a fifth of the pre-training. Too little for the base model to learn to
# copy a number from anywhere in the text (that takes ~200 steps of batch 16 with four layers), so the
# numbers are mostly wrong, but fine-tuning still visibly teaches the answer format (`right form`).
QUICK = DemoSettings(
    pretrain_rows=2000,
    pretrain_steps=200,
    pretrain_batch_size=8,
    sft_rows=500,
    sft_steps=30,
    eval_rows=32,
    test_rows=100,
    model=ModelSize(num_hidden_layers=2),
)


@dataclass(frozen=True)
class DemoResult:
    accuracy_before: float  # exact match on the held-out questions
    accuracy_after: float
    well_formed_before: float  # replies of the right form: a number and the asked-for unit
    well_formed_after: float
    seconds: dict[str, float]
    sft_dir: Path
    report: Path


def run_demo(quick: bool, output_dir: Path, console: Console) -> DemoResult:
    import datasets

    datasets.disable_progress_bars()  # the demo's own progress bars are the training ones
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's matrices are tiny: a second thread gains little, and when another process holds a
        # core every operation waits for the descheduled thread (3-10x slower, measured). Set
        # OMP_NUM_THREADS to choose yourself.
        torch.set_num_threads(1)
    try:
        return _run(QUICK if quick else FULL, Path(output_dir), console)
    finally:
        torch.set_num_threads(threads)


def _run(settings: DemoSettings, output_dir: Path, console: Console) -> DemoResult:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    console.rule("[bold]1 · The task")
    task = make_task(SEED, settings.pretrain_rows, settings.sft_rows, settings.eval_rows, settings.test_rows)
    show_task(task, console)
    write_task(task, output_dir / "data")
    lap("data")

    console.rule("[bold]2 · A tiny base model, built and pre-trained here")
    pretrain_config, sft_config = demo_configs(output_dir, settings)
    build_base(task, output_dir / "init", settings.model, console)
    console.print(
        f"Pre-training on raw text with [bold]sftkit train[/bold] ({settings.pretrain_steps} steps, "
        "full fine-tuning): the model learns the conversions, but never sees a question or a chat turn."
    )
    from sftkit.train.loop import train

    train(pretrain_config, console)
    lap("pretrain")

    console.rule("[bold]3 · The fine-tuning data (sftkit data inspect)")
    inspect_data(sft_config, console)
    console.rule("[bold]4 · The plan (sftkit plan)")
    show_plan(sft_config, console)
    lap("inspect+plan")

    console.rule("[bold]5 · Before fine-tuning")
    before = score_base(sft_config.model_name_or_path, task)
    show_score("base model", before, console)
    lap("score before")

    console.rule("[bold]6 · Fine-tuning (sftkit train demo.yaml)")
    started = time.perf_counter()
    train(sft_config, console)
    lap("fine-tune")
    train_seconds = time.perf_counter() - started

    console.rule("[bold]7 · After fine-tuning")
    sft_dir = Path(sft_config.output_dir)
    after = score_adapter(sft_dir / "adapter", task)
    show_score("base + LoRA adapter", after, console)
    lap("score after")
    report = write_report(sft_dir, console)
    lap("report")

    scores = Table(title=f"sftkit demo: {len(task.test)} held-out questions", title_justify="left")
    for column in ("", "base model", "after fine-tuning"):
        scores.add_column(column, justify="right")
    scores.add_row("exact match", f"{before.accuracy:.0%}", f"[bold green]{after.accuracy:.0%}[/bold green]")
    scores.add_row("right form (number + unit)", f"{before.well_formed:.0%}", f"{after.well_formed:.0%}")
    console.print(scores)
    summary = Table(show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("fine-tuning", f"{train_seconds:.0f} s ({sft_config.max_steps} steps, LoRA r={sft_config.lora_r})")
    summary.add_row(
        "whole demo",
        f"{sum(seconds.values()):.0f} s ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + ")",
    )
    summary.add_row("run directory", str(sft_dir))
    summary.add_row("report", str(report))
    console.print(summary)
    return DemoResult(before.accuracy, after.accuracy, before.well_formed, after.well_formed, seconds, sft_dir, report)


def demo_configs(output_dir: Path, settings: DemoSettings) -> tuple[SFTConfig, SFTConfig]:
    """The shipped YAML files, pointed at OUTPUT_DIR and sized for `--quick` or the full demo."""
    folder = resources.files("sftkit.demo")
    data = output_dir / "data"
    pretrain = load_config(
        Path(str(folder.joinpath("pretrain.yaml"))),
        {
            "model_name_or_path": str(output_dir / "init"),
            "datasets.0.path": str(data / "pretrain.jsonl"),
            "output_dir": str(output_dir / "pretrain"),
            "max_steps": settings.pretrain_steps,
            "per_device_train_batch_size": settings.pretrain_batch_size,
        },
    )
    sft = load_config(
        Path(str(folder.joinpath("demo.yaml"))),
        {
            "model_name_or_path": str(output_dir / "pretrain" / "model"),
            "datasets.0.path": str(data / "train.jsonl"),
            "eval_dataset.path": str(data / "eval.jsonl"),
            "output_dir": str(output_dir / "sft"),
            "max_steps": settings.sft_steps,
        },
    )
    return pretrain, sft


def build_base(task: TaskData, path: Path, size: ModelSize, console: Console) -> None:
    """Tokenizer trained on the task's text (both shapes) and a random Llama, saved like a hub model."""
    from transformers import AutoTokenizer

    chat = [text for p in task.train for text in (p.prompt(), p.answer)]
    build_tokenizer(task.pretrain_text + chat + ["user\nassistant\n"] * 100, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, params = build_model(len(tokenizer), path, size)
    console.print(
        f"Tokenizer: byte-level BPE, {len(tokenizer)} tokens (35000 = 35 + 000); chat template "
        "<|im_start|>role\\n…<|im_end|> (the end of a turn is one token)",
        highlight=False,
    )
    console.print(
        f"Model: Llama, {size.num_hidden_layers} layers, hidden {size.hidden_size}, "
        f"{params / 1e6:.2f}M parameters, random weights → {path}"
    )


def show_task(task: TaskData, console: Console) -> None:
    table = Table(
        title=f"Fine-tuning examples ({len(task.train)} train, {len(task.eval)} eval, {len(task.test)} held-out test)",
        title_justify="left",
    )
    table.add_column("user")
    table.add_column("assistant")
    for problem in task.train[:3]:
        table.add_row(problem.prompt(), problem.answer)
    console.print(table)
    facts = task.pretrain_text[0].splitlines()
    console.print(
        f"Pre-training text ({len(task.pretrain_text):,} rows of {len(facts)} facts, no questions): "
        f"[cyan]{facts[0]}[/cyan]  ·  [cyan]{facts[1]}[/cyan]  ·  …",
        highlight=False,
    )


def inspect_data(config: SFTConfig, console: Console) -> None:
    from sftkit.data.dataset import DataOptions, prepare_data
    from sftkit.data.inspect import data_stats, masked_segments, print_stats
    from sftkit.data.template import resolve_chat_template
    from sftkit.model.load import load_tokenizer

    tokenizer = load_tokenizer(config.model_name_or_path)
    template = resolve_chat_template(config.chat_template, tokenizer)
    data = prepare_data(DataOptions.from_config(config, template), tokenizer)
    first = data.tokenized_train().dataset[0]
    print_stats(
        data_stats(data, config.max_seq_length, config.per_device_train_batch_size),
        masked_segments(first["input_ids"], first["labels"], tokenizer),
        console,
    )


def show_plan(config: SFTConfig, console: Console) -> None:
    from sftkit.plan import run_plan

    console.print("(`sftkit plan` plans for a GPU; this demo runs on the CPU, where it takes seconds.)")
    run_plan(config, console=console)


def score_base(model_dir: str, task: TaskData) -> Score:
    from sftkit.data.template import resolve_chat_template
    from sftkit.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    return score(model, tokenizer, resolve_chat_template(None, tokenizer), task.test)


def score_adapter(adapter_dir: Path, task: TaskData) -> Score:
    from sftkit.generate import load_trained

    model, tokenizer, template = load_trained(adapter_dir)
    return score(model, tokenizer, template, task.test)


def show_score(name: str, result: Score, console: Console, rows: int = 4) -> None:
    table = Table(
        title=f"{name}: exact match {result.accuracy:.0%}, right form {result.well_formed:.0%} "
        f"on {len(result.replies)} held-out questions",
        title_justify="left",
    )
    table.add_column("prompt")
    table.add_column("expected")
    table.add_column("model's reply")
    for reply in result.replies[:rows]:
        mark = "[green]✓[/green]" if reply.correct else "[red]✗[/red]"
        table.add_row(reply.prompt, reply.expected, f"{mark} {reply.got[:60]!r}")
    console.print(table)


def write_report(run_dir: Path, console: Console) -> Path:
    from sftkit.report import build_report

    return build_report(run_dir, console=console)
