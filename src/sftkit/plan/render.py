"""The plan as rich tables, in the order a user reads it: data, schedule, memory, changes, time, GPUs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

GIB = 2**30
TIGHT = 0.9  # estimates are within ~15%: less than 10% free is worth a word


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _table(title: str, *columns: str, header: bool = True) -> Table:
    table = Table(title=title, title_justify="left", show_header=header)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def print_plan(plan: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    model = plan["model"]
    console.print(
        f"[bold]{model['name']}[/bold] ({model['type']}): {model['parameters']:,} parameters, "
        f"{model['trainable_parameters']:,} trained ({model['finetuning']}, {model['weight_dtype']} weights, "
        f"{model['attn_implementation']} attention, chunked loss {'on' if model['chunked_loss'] else 'off'})",
        highlight=False,
    )
    for note in plan["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    _print_data(plan["data"], console)
    _print_schedule(plan["schedule"], console)
    _print_memory(plan, console)
    _print_time(plan["time"], plan["schedule"]["num_gpus"], console)
    gpus = _table("Known GPUs", "GPU", "memory", "fits")
    for gpu in plan["known_gpus"]:
        gpus.add_row(gpu["gpu"], f"{gpu['memory_bytes'] / GIB:.0f} GiB", "yes" if gpu["fits"] else "no")
    console.print(gpus)


def _print_data(data: dict[str, Any], console: Console) -> None:
    if "error" in data:
        console.print(
            f"[yellow]Data:[/yellow] {data['error']}; the schedule below uses max_steps only",
            highlight=False,
            soft_wrap=True,
        )
        return
    table = _table("Data", "what", "value", header=False)
    rows = [
        ("train / eval examples", f"{data['train_examples']:,} / {data['eval_examples']:,}"),
        ("tokens", f"{data['total_tokens']:,}"),
        ("trained tokens", f"{data['trained_tokens']:,} ({data['trained_token_fraction']:.1%})"),
        ("examples over max_seq_length", f"{data['examples_over_max_seq_length']:,} (> {data['max_seq_length']})"),
        ("truncated", f"{data['truncated_examples']:,}"),
        (
            "example tokens median / p95 / max",
            f"{data['example_tokens']['median']:.0f} / {data['example_tokens']['p95']:.0f} / "
            f"{data['example_tokens']['max']}",
        ),
        ("packed sequences", f"{data['packed_sequences']:,}"),
        ("packing efficiency", f"{data['packing_efficiency']:.2%}"),
        ("padding efficiency (no packing)", f"{data['padding_efficiency']:.2%}"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


def _print_schedule(schedule: dict[str, Any], console: Console) -> None:
    table = _table("Batch and schedule", "what", "value", header=False)
    table.add_row(
        "effective batch",
        f"{schedule['micro_batch']} micro × {schedule['gradient_accumulation']} GA × "
        f"{schedule['num_gpus']} GPU = {schedule['effective_batch']}",
    )
    unknown = "unknown (data not read)"
    spe = schedule["steps_per_epoch"]
    table.add_row("steps per epoch", f"{spe:,} ({schedule['sequences_per_epoch']:,} sequences)" if spe else unknown)
    table.add_row("total steps", f"{schedule['total_steps']:,}" if schedule["total_steps"] else unknown)
    table.add_row("epochs", f"{schedule['epochs']:.2f}" if schedule["epochs"] is not None else unknown)
    table.add_row("warmup steps", str(schedule["warmup_steps"]) if schedule["warmup_steps"] is not None else unknown)
    table.add_row("schedule", f"{schedule['lr_scheduler_type']}, peak {schedule['learning_rate']:g}")
    console.print(table)
    if schedule["lr_points"]:
        lr = _table("Learning rate", "step", "progress", "LR", "% of peak")
        for point in schedule["lr_points"]:
            lr.add_row(
                f"{point['step']:,}",
                f"{point['progress']:.0%}",
                f"{point['lr']:.3g}",
                f"{point['fraction_of_peak']:.1%}",
            )
        console.print(lr)
    for warning in schedule["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _print_memory(plan: dict[str, Any], console: Console) -> None:
    memory = plan["memory"]
    title = (
        f"Memory per GPU (micro batch {memory['micro_batch']} × {memory['seq_len']} tokens, "
        f"gradient checkpointing {'on' if memory['gradient_checkpointing'] else 'off'})"
    )
    table = _table(title, "part", "bytes")
    table.caption = (
        "Gradients grow in backward as activations are freed: the peak is the end of forward "
        "(activations + loss) or the optimizer step (gradients + AdamW buffers), whichever is larger."
    )
    for part, value in memory["parts"].items():
        detail = ""
        if part == "weights":
            detail = " (" + ", ".join(f"{k} {_gib(v)}" for k, v in memory["weights_by_dtype"].items()) + ")"
        if part == "activations":
            detail = (
                f" (with backward: checkpointing off {_gib(memory['activations_without_checkpointing'])}, "
                f"on {_gib(memory['activations_with_checkpointing'])})"
            )
            if memory.get("activation_offloading"):
                detail = f" (offloaded: {_gib(memory['activations_on_host'])} wait in pinned host memory)"
        if part.startswith("loss"):
            detail = f" (logits and loss {_gib(memory['loss_bytes'])})"
        held = part in memory["held_at_peak"]
        table.add_row(part + detail, _gib(value) if held else f"[dim]{_gib(value)}, not at the peak[/dim]")
    verdict = "[red]does not fit[/red]"
    if plan["fits"]:
        verdict = (
            "[green]fits[/green]"
            if memory["total_bytes"] <= TIGHT * memory["gpu_bytes"]
            else "[yellow]fits, tight (< 10% free)[/yellow]"
        )
    table.add_row(
        f"[bold]total vs {memory['gpu']} ({_gib(memory['gpu_bytes'])})[/bold]",
        f"[bold]{_gib(memory['total_bytes'])}[/bold] {verdict}",
    )
    console.print(table)
    trade_off = plan.get("lora_vs_qlora")
    if trade_off:
        saved = 1 - trade_off["qlora_bytes"] / trade_off["lora_bytes"]
        console.print(
            f"LoRA {_gib(trade_off['lora_bytes'])} vs QLoRA {_gib(trade_off['qlora_bytes'])} "
            f"({saved:.0%} less memory); {trade_off['time']}.",
            highlight=False,
        )
    if plan["changes"]:
        title = "Changes that make it fit" if not plan["fits"] else "Room to spare: changes that go faster"
        changes = _table(title, "change", "new estimate", "fits", "cost")
        for change in plan["changes"]:
            fits = (
                "no"
                if not change["fits"]
                else "yes"
                if change["total_bytes"] <= TIGHT * memory["gpu_bytes"]
                else "tight"
            )
            changes.add_row(change["change"], _gib(change["total_bytes"]), fits, change["note"])
        console.print(changes)


def _print_time(time: dict[str, Any], num_gpus: int, console: Console) -> None:
    table = _table("Estimated time", "what", "value", header=False)
    table.add_row(
        "tokens to process", f"{time['tokens']:,} ({time['tokens_note']})" if time["tokens"] else time["tokens_note"]
    )
    table.add_row("training FLOPs per token", f"{time['flops_per_token']:.3g}")
    rate = time["tokens_per_second_per_gpu"]
    shown = f"{rate:,.0f}" if rate and rate >= 100 else f"{rate:.3g}"
    table.add_row(
        "throughput per GPU", f"{shown} tokens/s ({time['throughput_source']})" if rate else time["throughput_source"]
    )
    if time["hours"] is not None:
        table.add_row(f"time on {num_gpus} GPU(s)", f"{time['hours']:.2f} h")
    console.print(table)
