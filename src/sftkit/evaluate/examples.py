"""Eval data: every training format, read as (prompt, reference) pairs.

The reference is the completion, or a conversation's last assistant turn; everything before it is the
prompt. Reading is linear in rows, and only the first `limit` rows are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftkit.config import DatasetSpec
from sftkit.data.formats import DataError, detect_format, read_source, row_to_messages


@dataclass(frozen=True)
class EvalExample:
    """One row to score: the messages before the reference (system/user/...), and the reference text."""

    row: int  # 1-based row of the file
    prompt: list[dict[str, str]]
    reference: str
    tools: str = ""
    format: str = field(default="messages", compare=False)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, reference included (what the `loss` metric scores)."""
        return [
            *self.prompt,
            {"role": "assistant", "content": self.reference, "tool_calls": "", "reasoning_content": ""},
        ]

    @property
    def question(self) -> str:
        """The last user message, for tables."""
        users = [message["content"] for message in self.prompt if message["role"] == "user"]
        return users[-1] if users else ""


def load_eval_examples(
    path: str, data_format: str = "auto", columns: dict[str, str] | None = None, limit: int | None = None
) -> list[EvalExample]:
    """The first `limit` rows of a data file (or folder, or hub dataset) as eval examples.

    Raises DataError naming the file and row when a row has no reference or fits no format.
    """
    spec = DatasetSpec.model_validate({"path": path, "format": data_format, "columns": columns or {}})
    raw = read_source(spec)
    if len(raw) == 0:
        raise DataError(f"{path}: the dataset is empty")
    fmt = detect_format(raw.column_names, spec)
    if fmt == "text":
        raise DataError(
            f"{path}: text rows have no reference to score against; give prompt/completion, alpaca or "
            "conversation rows (map your columns with --column prompt=NAME --column completion=NAME)"
        )
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    examples = []
    for index, row in enumerate(raw):
        examples.append(_example(row, index + 1, fmt, dict(spec.columns), path))
    return examples


def _example(row: dict[str, Any], number: int, fmt: str, columns: dict[str, str], path: str) -> EvalExample:
    messages, tools, _, error = row_to_messages(row, fmt, columns, system_prompt=None)
    if error:
        raise DataError(
            f"{path}: row {number}: {error}; every eval row needs a prompt and a reference (the completion, "
            "or a last assistant turn)"
        )
    return _split(messages, tools, number, fmt, path)


def _split(messages: list[dict[str, str]], tools: str, number: int, fmt: str, where: str) -> EvalExample:
    """The last assistant turn is the reference; the turns before it, the prompt."""
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(
            f"{where}: row {number}: the conversation does not end with a non-empty assistant turn, so it has no "
            "reference; end each eval conversation with the reply to score against"
        )
    return EvalExample(number, messages[:-1], messages[-1]["content"], tools, fmt)


def examples_from_rows(rows: Any, limit: int, where: str) -> list[EvalExample]:
    """The first `limit` of a training run's normalised eval rows (columns messages, tools, source_row) as eval
    examples; `where` names the eval set in errors."""
    first = rows.select(range(min(limit, len(rows))))
    return [
        _split(messages, tools or "", row + 1, "messages", where)
        for messages, tools, row in zip(first["messages"], first["tools"], first["source_row"], strict=True)
    ]
