"""The eval table as text rows, from a summary (the dict summary.json holds), shared by the console and report.html.

metric              base    tuned   difference   95% interval        better / worse
extract #### (\\S+)  1.5%    6.0%    +4.5 pts     [+1.5, +8.0] pts    11 / 2
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

RATES = ("exact", "extract", "contains")  # 0/1 per example: shown as a percentage, differences in points
COLUMNS = ("metric", "base", "tuned", "difference", "95% interval", "better / worse")


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """`["prompt=question", "completion=answer"]` → {"prompt": "question", "completion": "answer"}."""
    from sftkit.config import ConfigError

    columns = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise ConfigError(f"--column {pair!r}: write KEY=NAME, e.g. --column prompt=question")
        columns[key.strip()] = name.strip()
    return columns


def _value(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    if metric in RATES:
        return f"{value:.1%}"
    return f"{value:.4f}" if metric == "loss" else f"{value:.1f}"


def _difference(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f} pts" if metric in RATES else f"{value:+.4f}" if metric == "loss" else f"{value:+.1f}"


def _interval(interval: list[float] | tuple[float, float] | None, metric: str) -> str:
    if not interval:
        return "–"
    low, high = interval
    if metric in RATES:
        return f"[{100 * low:+.1f}, {100 * high:+.1f}] pts"
    return f"[{low:+.4f}, {high:+.4f}]" if metric == "loss" else f"[{low:+.1f}, {high:+.1f}]"


def verdict(row: dict[str, Any]) -> str:
    """In words: better, worse, or not distinguishable from noise on these examples."""
    interval = row.get("interval")
    if not interval:
        return ""
    low, high = interval
    if low <= 0 <= high:
        return "no clear difference"
    improved = (low > 0) == bool(row.get("higher_is_better", True))
    return "tuned is better" if improved else "tuned is worse"


def metric_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """One row of display strings per metric."""
    rows = []
    for row in summary.get("metrics", []):
        name = str(row["metric"]).split()[0]
        counts = f"{row['wins']} / {row['losses']}" if row.get("wins") is not None else "–"
        rows.append(
            {
                "metric": str(row["metric"]),
                "base": _value(row.get("base"), name),
                "tuned": _value(row.get("tuned"), name),
                "difference": _difference(row.get("difference"), name),
                "95% interval": _interval(row.get("interval"), name),
                "better / worse": counts,
                "verdict": verdict(row),
            }
        )
    return rows


def print_result(result: Any, console: Console) -> None:
    """The table, then where the files went."""
    summary = result.summary()
    table = Table(
        title=f"{summary['model']} on {summary['data']} ({summary['examples']} examples)",
        title_justify="left",
    )
    for column in (*COLUMNS, "verdict"):
        table.add_column(column, overflow="fold")
    for row in metric_rows(summary):
        table.add_row(*(Text(row[column]) for column in (*COLUMNS, "verdict")))
    console.print(table)
    if summary.get("base_model"):
        console.print(Text(f"base: {summary['base_model']}", style="dim"))
    seconds = ", ".join(f"{name} {value:.0f} s" for name, value in summary.get("seconds", {}).items())
    console.print(Text(f"generated with {summary.get('engine', 'transformers')}: {seconds}", style="dim"))
    for name, share in summary.get("ended", {}).items():
        console.print(Text(f"{name}: {share:.0%} of replies ended with the end-of-turn token", style="dim"))
    if summary.get("truncated"):
        console.print(
            Text(f"{summary['truncated']} loss examples were cut on the left to fit --max-length", style="yellow")
        )
    if summary.get("out"):
        console.print(f"wrote {summary['out']}/summary.json and predictions.jsonl", highlight=False)
