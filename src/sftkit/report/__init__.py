"""`sftkit report RUN_DIR`: RUN_DIR/report.html and a console summary of a run, finished or not.

read.py      the run directory, tolerant of a run still writing or one that crashed
summary.py   the figures and tables, as text rows shared by page and console
plots.py     matplotlib curves as PNG bytes
page.py      the self-contained HTML page
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sftkit.report import summary
from sftkit.report.evaluation import evaluation_section
from sftkit.report.page import render_page
from sftkit.report.plots import all_plots
from sftkit.report.read import RunRecord, read_run

__all__ = ["RunRecord", "build_report", "read_run"]
STATUS_STYLE = {"finished": "green", "early_stopped": "green", "running": "blue", "crashed": "red", "stopped": "yellow"}


def build_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write RUN_DIR/report.html and print the summary; returns the page's path."""
    record = read_run(Path(run_dir))
    html = render_page(record, all_plots(record))
    path = record.run_dir / "report.html"
    partial = path.with_name(".report.html.tmp")
    partial.write_text(html, encoding="utf-8")
    os.replace(partial, path)  # a browser open on the old page never sees half a file
    if console is not None:
        print_summary(record, console)
        console.print(f"report written to [bold]{escape(str(path))}[/bold]")
    return path


def print_summary(record: RunRecord, console: Console) -> None:
    style = STATUS_STYLE.get(record.status, "yellow")
    console.rule(f"[bold]{escape(str(record.run_dir))}[/bold]  [{style}]{escape(record.status)}[/{style}]")
    console.print(_pairs(summary.headline_rows(record)))
    for note in record.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    (config_title, config), *others = summary.fact_sections(record)
    right = Group(*(_pairs(rows, title) for title, rows in others))
    if console.width >= 120:  # config on the left, data and schedule stacked on the right
        facts = Table.grid(padding=(0, 4))
        facts.add_row(_pairs(config, config_title), right)
        console.print(facts)
    else:
        console.print(_pairs(config, config_title), right)
    if record.findings:
        table = Table(title="Diagnosis", title_justify="left", show_lines=True)
        for column in ("step", "kind", "message", "advice"):
            table.add_column(column, overflow="fold")
        for finding in record.findings:
            table.add_row(*(Text(str(finding[key])) for key in ("step", "kind", "message", "advice")))
        console.print(table)
    else:
        console.print("[green]Diagnosis: no problems detected.[/green]")
    evaluation = evaluation_section(record)
    if evaluation:
        table = Table(title=f"Evaluation: {evaluation['facts']}", title_justify="left")
        for column in evaluation["columns"]:
            table.add_column(column, overflow="fold")
        for row in evaluation["rows"]:
            table.add_row(*(Text(row[column]) for column in evaluation["columns"]))
        console.print(table)
    samples = summary.samples_by_prompt(record)
    if samples:
        table = Table(title="Samples (first and last sample step)", title_justify="left", show_lines=True)
        table.add_column("prompt", overflow="fold", max_width=32)
        for column in ("step", "ended", "completion"):
            table.add_column(column, overflow="fold")
        for prompt, rows in samples.items():
            for sample in {id(row): row for row in (rows[0], rows[-1])}.values():
                table.add_row(
                    Text(_clip(prompt, 60)),
                    str(sample["step"]),
                    "yes" if sample["ended"] else "no",
                    Text(_clip(sample["completion"], 240)),
                )
        console.print(table)
    checkpoints = summary.checkpoint_rows(record)
    if checkpoints:
        console.print(
            Text(
                "checkpoints: "
                + ", ".join(row["name"] + (f" ({row['note']})" if row["note"] else "") for row in checkpoints)
            )
        )


def _pairs(rows: list[tuple[str, str]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, Text(value))  # Text: user content like "[INST]" is not markup
    return table


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
