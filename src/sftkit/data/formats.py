"""Read data files and bring every row to one shape: a list of `{role, content}` messages.

Formats (detected from the columns when `format: auto`):

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       assistant turns may carry `tool_calls` and `reasoning_content` (or `thinking`);
                       `tool` turns hold tool results; an optional `tools` column lists the functions
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}   plain language modelling, every token trained

A row that fits no format is never dropped silently: it stops the run with its file and row number,
or, with `skip_bad_rows`, it is counted by reason and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from sftkit.config import DatasetSpec
from sftkit.data.chunked_map import map_in_chunks
from sftkit.errors import SftkitError

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "tools"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "ipython": "tool",
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(SftkitError, ValueError):
    """A problem in the user's data: names the file, the row and what to do."""


@dataclass
class LoadedSource:
    """One data source brought to the canonical `messages`/`text` shape."""

    name: str
    format: str
    dataset: datasets.Dataset  # columns: messages, tools, text, source_row
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)


def source_kind(spec: DatasetSpec) -> str:
    """'file', 'folder' or 'hub'; a local path that does not exist or a file type we cannot read is a DataError."""
    path = Path(spec.path)
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .parquet or .csv")
        return "file"
    if path.is_dir():
        return "folder"
    if spec.path.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise DataError(
            f"{spec.path}: file not found; check `path` under `datasets` (or `eval_dataset`) in your config, "
            "relative to the directory you run sftkit from"
        )
    return "hub"


def read_source(spec: DatasetSpec) -> datasets.Dataset:
    """Load a local file, a folder or a hub dataset with `datasets` (so it is cached and memory-mapped)."""
    path = Path(spec.path)
    kind = source_kind(spec)
    if kind == "file":
        _check_text_file(path)
        if path.suffix.lower() == ".json":
            check_json_layout(path, spec)
        try:
            ds = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as err:  # datasets/pyarrow errors do not say which line is wrong
            raise _explain_load_error(path, err) from None
    elif kind == "folder":
        try:
            ds = datasets.load_dataset(str(path), split=spec.split)
        except Exception as err:
            raise DataError(f"{path}: could not read the folder as a dataset ({err})") from None
    else:
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as err:
            raise DataError(f"{spec.path}: could not load hub dataset (split '{spec.split}'): {err}") from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split always given above
        ds = ds[spec.split]
    return ds


def _check_text_file(path: Path) -> None:
    """JSON and CSV must be UTF-8; find the first bad line so the user can fix it."""
    if path.suffix.lower() == ".parquet":
        return
    has_content = False
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            decode_line(path, line_number, line)
            has_content = has_content or bool(line.strip())
    if not has_content:
        raise empty_file_error(path)


def decode_line(path: Path, line_number: int, line: bytes) -> str:
    """One line of a JSON or CSV file as text, or a DataError naming the line and the first bad byte."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: line {line_number}: not UTF-8 text (byte {err.object[err.start]:#x} at column {err.start + 1}); "
            "re-save the file as UTF-8"
        ) from None


def empty_file_error(path: Path) -> DataError:
    return DataError(f"{path}: the file is empty; add rows to it, or point `datasets[].path` at the right file")


def check_json_layout(path: Path, spec: DatasetSpec) -> None:
    """A .json file holds a list of row objects or one object per line, not rows nested under a key."""
    if starts_with(path, "["):
        return
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return  # JSON Lines in a .json file (or broken JSON, explained after the load fails)
    layout = "a list of JSON objects (one per row), or one JSON object per line"
    if not isinstance(value, dict):
        raise DataError(f"{path}: the top level is a JSON {type(value).__name__}; expected {layout}")
    row_columns = {"messages", "conversations", *spec.columns.values()}
    nested = [
        key
        for key, item in value.items()
        if key not in row_columns and isinstance(item, list) and item and all(isinstance(row, dict) for row in item)
    ]
    if nested:
        raise DataError(
            f"{path}: the rows are nested under the key '{nested[0]}' of one JSON object; expected {layout}: "
            f"save the list under '{nested[0]}' as the whole file"
        )


def _explain_load_error(path: Path, err: Exception) -> DataError:
    if path.suffix.lower() == ".jsonl" or (path.suffix.lower() == ".json" and not starts_with(path, "[")):
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        parse_json_line(path, line_number, line)
                    except DataError as bad:
                        return bad
    elif path.suffix.lower() == ".json":
        try:
            value = parse_json_file(path)
        except DataError as bad:
            return bad
        if isinstance(value, list):
            for index, item in enumerate(value, start=1):
                if not isinstance(item, dict):
                    return list_item_error(path, index, item)
    return DataError(
        f"{path}: could not read the file ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}); "
        "check that every row has the same columns with the same types"
    )


def parse_json_line(path: Path, line_number: int, line: str) -> dict[str, Any]:
    """One line of a JSON Lines file as a row object, or a DataError naming the line."""
    try:
        value = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as bad:
        raise DataError(
            f"{path}: line {line_number}: not valid JSON ({bad.msg} at column {bad.colno}); "
            "each line must be one JSON object"
        ) from None
    if not isinstance(value, dict):
        raise DataError(
            f"{path}: line {line_number}: expected a JSON object per line, got {type(value).__name__}; "
            'write each row as one object, e.g. {"messages": [...]}'
        )
    return value


def parse_json_file(path: Path) -> Any:
    """A whole JSON file's value, or a DataError naming the line where it stops being JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as bad:
        raise DataError(f"{path}: line {bad.lineno}: not valid JSON ({bad.msg} at column {bad.colno})") from None


def list_item_error(path: Path, row_number: int, item: Any) -> DataError:
    return DataError(
        f"{path}: row {row_number}: expected a JSON object, got {type(item).__name__}; "
        'each item of the list must be one row object, e.g. {"messages": [...]}'
    )


def starts_with(path: Path, char: str) -> bool:
    with path.open(encoding="utf-8") as handle:
        return handle.read(4096).lstrip().startswith(char)


def detect_format(columns: list[str], spec: DatasetSpec) -> str:
    """Pick the format from the columns (after the user's column mapping)."""
    unknown = [canonical for canonical in spec.columns if not any(canonical in f for f in FORMAT_FIELDS.values())]
    if unknown:
        fields = sorted({f for fs in FORMAT_FIELDS.values() for f in fs})
        raise DataError(
            f"{spec.path}: `columns` maps '{unknown[0]}', which is no format's column; "
            f"map one of {fields} to a column of your file"
        )
    absent = {canonical: theirs for canonical, theirs in spec.columns.items() if theirs not in columns}
    if absent:
        canonical, theirs = next(iter(absent.items()))
        raise DataError(
            f"{spec.path}: `columns` maps {canonical} to '{theirs}', which is not a column of the file "
            f"(columns: {sorted(columns)}); fix the mapping in `datasets[].columns`"
        )
    mapped = set(spec.columns)
    present = set(columns) | mapped
    if spec.format != "auto":
        missing = [f for f in REQUIRED_FIELDS[spec.format] if f not in present]
        if missing:
            raise DataError(
                f"{spec.path}: format '{spec.format}' needs column(s) {missing}, found {sorted(columns)}; "
                f"map them with `columns:`, e.g. columns: {{{missing[0]}: <your column>}}"
            )
        return spec.format
    for name in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if all(f in present for f in REQUIRED_FIELDS[name]):
            return name
    raise DataError(
        f"{spec.path}: cannot tell the format from columns {sorted(columns)}; set `format:` "
        "(messages, sharegpt, alpaca, prompt_completion, text) and map your columns with `columns:`, "
        "e.g. format: prompt_completion, columns: {prompt: question, completion: answer}"
    )


def row_to_messages(
    row: dict[str, Any], fmt: str, columns: dict[str, str], system_prompt: str | None
) -> tuple[list[dict[str, str]], str, str, str]:
    """One raw row → (messages, tools as JSON text, text, error). `error` is empty when the row is good.

    Every message has the keys role, content, tool_calls (JSON text, "" if none) and reasoning_content
    ("" if none), so all rows share one Arrow schema."""

    def get(key: str) -> Any:
        return row.get(columns.get(key, key))

    if fmt == "text":
        text = get("text")
        if not isinstance(text, str) or not text.strip():
            return [], "", "", "empty or non-string text"
        return [], "", text, ""
    tools = ""
    if fmt in ("messages", "sharegpt"):
        turns = get(FORMAT_FIELDS[fmt][0])
        if not isinstance(turns, list):
            return [], "", "", f"'{columns.get(FORMAT_FIELDS[fmt][0], FORMAT_FIELDS[fmt][0])}' is not a list of turns"
        role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
        messages = []
        for turn_number, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                return [], "", "", f"a turn is not an object: turn {turn_number} is of type {type(turn).__name__}"
            message, error = _read_turn(turn, turn_number, role_key, content_key)
            if error:
                return [], "", "", error
            messages.append(message)
        tools, error = _read_tools(get("tools"))
        if error:
            return [], "", "", error
    elif fmt == "alpaca":
        instruction, extra, output = get("instruction"), get("input"), get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return [], "", "", "instruction or output is missing or not a string"
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [_message("user", prompt), _message("assistant", output)]
    else:  # prompt_completion
        prompt, completion = get("prompt"), get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return [], "", "", "prompt or completion is missing or not a string"
        messages = [_message("user", prompt), _message("assistant", completion)]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [_message("system", system_prompt), *messages]
    return messages, tools, "", check_conversation(messages)


def _message(role: str, content: str, tool_calls: str = "", reasoning: str = "") -> dict[str, str]:
    return {"role": role, "content": content, "tool_calls": tool_calls, "reasoning_content": reasoning}


def _read_turn(turn: dict[str, Any], number: int, role_key: str, content_key: str) -> tuple[dict[str, str], str]:
    """One turn → (message, error)."""
    role = turn.get(role_key, turn.get("role"))
    content = turn.get(content_key, turn.get("content"))
    if role not in ROLE_ALIASES:
        return {}, f"unknown role: {role!r} in turn {number} (use system, user or assistant; tool for tool results)"
    role = ROLE_ALIASES[role]
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        return {}, f"turn {number} ({role}) has tool_calls; only assistant turns call tools"
    tool_calls, error = _read_tool_calls(calls, number) if calls is not None else ("", "")
    if error:
        return {}, error
    if content is None and tool_calls:
        content = ""  # a turn that only calls tools (OpenAI writes content: null)
    if not isinstance(content, str):
        return {}, f"content is not a string: turn {number} ({role}) has content of type {type(content).__name__}"
    reasoning = turn.get("reasoning_content", turn.get("thinking"))
    if reasoning is not None and not isinstance(reasoning, str):
        return {}, f"reasoning_content is not a string: turn {number} has one of type {type(reasoning).__name__}"
    return _message(role, content, tool_calls, reasoning or ""), ""


def _read_tool_calls(calls: Any, number: int) -> tuple[str, str]:
    """An assistant turn's tool calls → (JSON text in the layout templates read, error).

    Each call is `{"type": "function", "function": {"name": ..., "arguments": {...}}}`; the flat
    `{"name", "arguments"}` form and arguments written as JSON text are accepted too."""
    if not isinstance(calls, list):
        return "", f"tool_calls of turn {number} is not a list"
    normalised = []
    for index, call in enumerate(calls, start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return (
                "",
                f'tool call {index} of turn {number} has no function name; write {{"type": "function", '
                '"function": {"name": ..., "arguments": {...}}}',
            )
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                return "", f"tool call {index} of turn {number}: arguments are not valid JSON ({err.msg})"
        if not isinstance(arguments, dict):
            return (
                "",
                f"tool call {index} of turn {number}: arguments must be an object, got {type(arguments).__name__}",
            )
        normalised.append(
            {"type": "function", "function": {"name": function["name"], "arguments": _without_nulls(arguments)}}
        )
    return json.dumps(normalised), ""


def _read_tools(tools: Any) -> tuple[str, str]:
    """The `tools` column → (JSON text, error): a list of function schemas, or nothing."""
    if tools is None or tools == "":
        return "", ""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            return "", f"tools is not valid JSON ({err.msg})"
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        return "", "tools must be a list of function schemas (objects)"
    return (json.dumps([_without_nulls(tool) for tool in tools]) if tools else ""), ""


def _without_nulls(value: Any) -> Any:
    """Drop null fields: a file's rows share one Arrow schema, so a key present in one row's arguments or tool
    schema comes back as null in every other row."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def check_conversation(messages: list[dict[str, str]]) -> str:
    """Empty string when the conversation is trainable, else why not.

    An optional system turn, then user and assistant alternating, user first; an assistant turn with
    tool_calls is followed by one or more tool turns, then the assistant again."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "a system turn after the first turn"
    if not body:
        return "no user or assistant turn"
    previous: dict[str, str] | None = None
    for index, message in enumerate(body):
        role = message["role"]
        if previous is None or (previous["role"] == "assistant" and not previous.get("tool_calls")):
            expected: tuple[str, ...] = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            expected = ("tool",)
        else:  # after a tool result: more results, or the assistant again
            expected = ("tool", "assistant")
        if role not in expected:
            if "tool" in (role, *expected):
                return (
                    f"roles out of order: turn {index + 1} is {role}, expected {' or '.join(expected)} (tool turns "
                    "follow an assistant turn with tool_calls, and the assistant speaks after them)"
                )
            return (
                f"roles out of order: turn {index + 1} is {role}, expected {expected[0]} (user and assistant must "
                "alternate, user first)"
            )
        previous = message
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn"
    if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in body):
        return "empty assistant reply"
    return ""


_STRING = datasets.Value("string")
NORMALISED_FEATURES = {
    "messages": [{"role": _STRING, "content": _STRING, "tool_calls": _STRING, "reasoning_content": _STRING}],
    "tools": _STRING,
    "text": _STRING,
    "source_row": datasets.Value("int64"),
}


def normalise_row(
    row: dict[str, Any], index: int, fmt: str, columns: dict[str, str], system_prompt: str | None
) -> dict[str, Any]:
    """One raw row (row `index` of its source, 0-based) → the canonical row; `error` is empty when it is good."""
    messages, tools, text, error = row_to_messages(row, fmt, columns, system_prompt)
    return {"messages": messages, "tools": tools, "text": text, "error": error, "source_row": index}


def bad_row_error(path: str, row_number: int, error: str, more: int = 0) -> DataError:
    """The error for a row that fits no format (`row_number` 1-based); `more`: bad rows after it, when known."""
    return DataError(
        f"{path}: row {row_number}: {error}"
        + (f" ({more} more bad rows)" if more else "")
        + "; fix the row, or set `skip_bad_rows: true` to skip such rows (they are counted and reported)"
    )


def count_skipped(skipped: dict[str, int], error: str) -> None:
    """Count a skipped row under its reason (the error up to its first colon)."""
    reason = error.split(":")[0]
    skipped[reason] = skipped.get(reason, 0) + 1


def load_source(spec: DatasetSpec, system_prompt: str | None, skip_bad_rows: bool, num_proc: int = 1) -> LoadedSource:
    """Read one source and normalise it. Bad rows stop the run unless `skip_bad_rows`."""
    raw = read_source(spec)
    if len(raw) == 0:
        raise DataError(f"{spec.path}: the dataset is empty")
    fmt = detect_format(raw.column_names, spec)
    normalise = partial(normalise_row, fmt=fmt, columns=dict(spec.columns), system_prompt=system_prompt)
    normalised = map_in_chunks(
        raw,
        normalise,
        num_proc,
        f"Reading {Path(spec.path).name}",
        with_indices=True,
        remove_columns=raw.column_names,
        features=datasets.Features({**NORMALISED_FEATURES, "error": datasets.Value("string")}),
    )
    # One Arrow column, checked with Arrow compute: Python strings only for the bad rows' reasons.
    errors = normalised.select_columns(["error"]).with_format("arrow")[:]["error"]
    is_bad = pc.not_equal(errors, "")
    bad = np.flatnonzero(is_bad.to_numpy(zero_copy_only=False))
    skipped: dict[str, int] = {}
    if len(bad):
        if not skip_bad_rows:
            raise bad_row_error(spec.path, int(bad[0]) + 1, errors[int(bad[0])].as_py(), more=len(bad) - 1)
        for error in pc.filter(errors, is_bad).to_pylist():  # the bad rows only
            count_skipped(skipped, error)
        normalised = normalised.select(np.flatnonzero(pc.invert(is_bad).to_numpy(zero_copy_only=False)))
    normalised = normalised.remove_columns("error")
    if len(normalised) == 0:
        raise DataError(f"{spec.path}: no usable rows left after skipping {sum(skipped.values())} bad rows {skipped}")
    return LoadedSource(name=spec.path, format=fmt, dataset=normalised, rows_read=len(raw), skipped=skipped)
