"""The figures a user needs before spending GPU hours: rows, formats, lengths, masking, waste, time.

Every figure comes from scalar Arrow columns read as numpy arrays (a few bytes per example), never
from the token rows themselves, so the cost is linear in examples and flat in tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sftkit.data.dataset import PreparedData
from sftkit.data.examples import column
from sftkit.data.packing import Packs, balanced, packing_efficiency, padding_efficiency
from sftkit.data.template import IGNORE_INDEX


def _length_stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0}
    array = np.asarray(values)
    return {
        "min": int(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
        "mean": float(array.mean()),
    }


def data_stats(data: PreparedData, max_seq_length: int, batch_size: int, packs: Packs | None = None) -> dict[str, Any]:
    """Everything `data inspect` prints, as plain JSON-able values. `packs`: the balanced packs when
    the caller already has them (training does), so they are not computed twice."""
    train_set = data.tokenized_train()
    train = train_set.dataset
    lengths = column(train, "length").astype(np.int64)
    full_lengths = column(train, "full_length")
    trained = int(column(train, "trained_tokens").sum())
    total = int(lengths.sum())
    bins = packs if packs is not None else balanced(lengths, max_seq_length)
    pack_eff = packing_efficiency(lengths, bins, batch_size)
    pad_eff = padding_efficiency(lengths, batch_size)
    return {
        "sources": _sources(data),
        "train_examples": len(train),
        "eval_examples": sum(len(evaluation.dataset) for evaluation in data.eval_sets.values()),
        "skipped_rows": data.skipped,
        "dropped_examples": train_set.dropped,
        "truncated_examples": int(column(train, "truncated").sum()),
        "examples_over_max_seq_length": int((full_lengths > max_seq_length).sum()),
        "max_seq_length": max_seq_length,
        "prompt_tokens": _length_stats(column(train, "prompt_tokens")),
        "response_tokens": _length_stats(column(train, "response_tokens")),
        "example_tokens": _length_stats(lengths),
        "total_tokens": total,
        "trained_tokens": trained,
        "trained_token_fraction": trained / total if total else 0.0,
        "packed_sequences": len(bins),
        "packing_efficiency": pack_eff,
        "packing_waste": 1 - pack_eff,
        "padding_efficiency": pad_eff,
        "padding_waste": 1 - pad_eff,
        "batch_size": batch_size,
    }


def _sources(data: PreparedData) -> list[dict[str, Any]]:
    """Each source's rows and, for training sources, its examples, tokens and share of trained tokens
    (grouped with Arrow over scalar columns)."""
    train = data.tokenized_train().dataset
    figures: dict[str, dict[str, Any]] = {}
    if "source" in train.column_names and len(train):
        table = train.select_columns(["source", "length", "trained_tokens"]).with_format("arrow")[:]
        grouped = table.group_by("source").aggregate(
            [("length", "count"), ("length", "sum"), ("trained_tokens", "sum")]
        )
        figures = {row["source"]: row for row in grouped.to_pylist()}
    trained_total = sum(row["trained_tokens_sum"] for row in figures.values()) or 1
    rows = []
    for source in data.sources:
        row = {"path": source.name, "format": source.format, "rows": source.rows_read, "skipped": source.skipped}
        found = figures.pop(source.name, None)  # a path listed twice (train and eval) gets its figures once
        if found:
            row.update(
                examples=found["length_count"],
                tokens=found["length_sum"],
                trained_tokens=found["trained_tokens_sum"],
                trained_share=found["trained_tokens_sum"] / trained_total,
            )
        rows.append(row)
    return rows


def with_mixture(stats: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    """Add each weighted source's target share of trained tokens, and how much more (or less) often
    than its size alone would give it the mixture draws from it (`rate`: 3.0 = each example ~3× as often)."""
    total = sum(weights.values())
    for source in stats["sources"]:
        if source["path"] in weights and source.get("trained_share"):
            source["target_share"] = weights[source["path"]] / total
            source["rate"] = source["target_share"] / source["trained_share"]
    return stats


def inspect_data(data: PreparedData, max_seq_length: int, batch_size: int, progress: bool = False) -> dict[str, Any]:
    """`data_stats` plus the wall time of each stage (read, tokenize, pack) and the tokenization speed.

    Speed counts every token tokenized (train and eval, before truncation); a second run served
    from the cache shows the cache's speed, not the tokenizer's.
    """
    train = data.tokenized_train().dataset
    started = time.perf_counter()
    packs = balanced(column(train, "length"), max_seq_length, progress=progress)
    seconds = {**data.seconds, "pack": time.perf_counter() - started}
    stats = data_stats(data, max_seq_length, batch_size, packs=packs)
    tokenized = int(column(train, "full_length").sum())
    tokenized += sum(int(column(evaluation.dataset, "full_length").sum()) for evaluation in data.eval_sets.values())
    speed = tokenized / seconds["tokenize"] if seconds.get("tokenize") else None
    return {**stats, "timings": {"seconds": seconds, "tokenized_tokens": tokenized, "tokens_per_s": speed}}


def dump_examples(data: PreparedData, count: int, path: Path) -> int:
    """Write the first `count` tokenized training examples (before packing) as JSONL."""
    train = data.tokenized_train().dataset
    rows = train.select(range(min(count, len(train))))
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(
                json.dumps(
                    {
                        "source": row["source"],
                        "row": row["source_row"] + 1,
                        "input_ids": row["input_ids"],
                        "labels": row["labels"],
                    }
                )
                + "\n"
            )
    return len(rows)


def masked_segments(input_ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """The example as (text, trained) runs, for showing masked and trained tokens apart."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    state = None
    for token, label in zip(input_ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if state is not None and is_trained != state:
            segments.append((tokenizer.decode(run), state))
            run = []
        run.append(token)
        state = is_trained
    if run:
        segments.append((tokenizer.decode(run), bool(state)))
    return segments


def print_stats(stats: dict[str, Any], example: list[tuple[str, bool]] | None, console: Any) -> None:
    """Rich tables of `data_stats`, and one example with trained tokens highlighted."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    sources = Table(title="Data sources", title_justify="left")
    mixture = any("target_share" in s for s in stats["sources"])
    columns = ["source", "format", "rows", "skipped", "examples", "trained tokens", "share"]
    for name in columns + (["target", "rate"] if mixture else []):
        sources.add_column(name, justify="left" if name in ("source", "format") else "right")
    for s in stats["sources"]:
        skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "0"
        cells = [Path(s["path"]).name or s["path"], s["format"], str(s["rows"]), skipped]
        cells += (
            [f"{s['examples']:,}", f"{s['trained_tokens']:,}", f"{s['trained_share']:.1%}"]
            if "examples" in s
            else ["eval", "", ""]
        )
        if mixture:
            cells += [f"{s['target_share']:.1%}", f"{s['rate']:.2f}"] if "target_share" in s else ["", ""]
        sources.add_row(*cells)
    console.print(sources)
    for s in stats["sources"]:
        if s.get("rate", 0) > 3:
            console.print(
                f"[yellow]{escape(s['path'])}: the mixture draws each of its examples about {s['rate']:.1f}× as "
                "often as concatenating the sources would; it will repeat sooner (on_exhausted) and may be "
                "memorised: watch its loss curve in the report[/yellow]",
                soft_wrap=True,
            )
    if "rendering" in stats:
        console.print(Text.assemble(("Rendering: ", "bold"), stats["rendering"]))

    lengths = Table(
        title=f"Token lengths ({stats['train_examples']} train examples, {stats['eval_examples']} eval)",
        title_justify="left",
    )
    for heading in ("", "min", "median", "p95", "max"):
        lengths.add_column(heading, justify="right")
    for name in ("prompt_tokens", "response_tokens", "example_tokens"):
        s = stats[name]
        lengths.add_row(name.replace("_", " "), str(s["min"]), f"{s['median']:.0f}", f"{s['p95']:.0f}", str(s["max"]))
    console.print(lengths)

    summary = Table(title="Training tokens and waste", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    dropped = ", ".join(f"{k}: {v}" for k, v in stats["dropped_examples"].items()) or "0"
    rows = [
        (
            "examples over max_seq_length",
            f"{stats['examples_over_max_seq_length']} (> {stats['max_seq_length']} tokens)",
        ),
        ("truncated / dropped", f"{stats['truncated_examples']} / {dropped}"),
        ("total tokens", f"{stats['total_tokens']:,}"),
        ("trained tokens", f"{stats['trained_tokens']:,} ({stats['trained_token_fraction']:.1%})"),
        (f"padding waste (batch {stats['batch_size']}, pad to longest)", f"{stats['padding_waste']:.1%}"),
        (
            f"packing waste ({stats['packed_sequences']} packs of <= {stats['max_seq_length']})",
            f"{stats['packing_waste']:.2%}",
        ),
        ("packing efficiency", f"{stats['packing_efficiency']:.2%} real tokens"),
    ]
    for what, value in rows:
        summary.add_row(what, value)
    console.print(summary)

    timings = stats.get("timings")
    if timings:
        times = Table(title="Time per stage", title_justify="left", show_header=False)
        times.add_column("stage")
        times.add_column("seconds", justify="right")
        for stage, seconds in timings["seconds"].items():
            times.add_row(stage, f"{seconds:.2f} s")
        if timings["tokens_per_s"]:
            times.add_row(
                "tokenization speed",
                f"{timings['tokens_per_s']:,.0f} tokens/s ({timings['tokenized_tokens']:,} tokens)",
            )
        console.print(times)

    if example:
        text = Text()
        for segment, trained in example:
            text.append(segment, style="bold green" if trained else "dim")
        console.print("[bold]First example[/bold] ([green]trained[/green], [dim]masked[/dim]):")
        console.print(text)
