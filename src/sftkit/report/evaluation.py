"""The report's evaluation section, from RUN_DIR/eval (written by `sftkit eval`): the table, and side by side
the examples where the tuned model beats its base and where it loses."""

from __future__ import annotations

from typing import Any

from sftkit.evaluate.table import COLUMNS, metric_rows
from sftkit.report.read import RunRecord

SHOWN = 5  # examples per side


def evaluation_section(record: RunRecord) -> dict[str, Any] | None:
    """None when the run has no eval summary; else the facts, the table and the two example lists."""
    summary = record.evaluation
    if not summary:
        return None
    metric, wins, losses = _contrast(summary, record.eval_predictions)
    return {
        "facts": f"{summary.get('model')} against {summary.get('base_model') or 'no base'} on {summary.get('data')} "
        f"({summary.get('examples')} examples)",
        "columns": (*COLUMNS, "verdict"),
        "rows": metric_rows(summary),
        "metric": metric,
        "wins": wins,
        "losses": losses,
    }


def _contrast(summary: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, list[dict], list[dict]]:
    """The first metric scored on generated text, and the first examples where tuned scores above / below base."""
    metrics = [m for m in summary.get("metrics", []) if m.get("metric") != "loss" and m.get("base") is not None]
    if not metrics or not rows:
        return "", [], []
    metric = str(metrics[0]["metric"])
    wins: list[dict] = []
    losses: list[dict] = []
    for row in rows:
        base, tuned = row.get("base") or {}, row.get("tuned") or {}
        difference = (tuned.get("scores") or {}).get(metric, 0) - (base.get("scores") or {}).get(metric, 0)
        side = wins if difference > 0 else losses if difference < 0 else None
        if side is not None and len(side) < SHOWN:
            side.append(
                {
                    "prompt": row.get("prompt", ""),
                    "reference": row.get("reference", ""),
                    "base": base.get("prediction", ""),
                    "tuned": tuned.get("prediction", ""),
                }
            )
    return metric, wins, losses
