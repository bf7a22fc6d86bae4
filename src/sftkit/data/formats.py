"""Read data files and bring every row to one shape: a list of `{role, content}` messages.

Formats (detected from the columns when `format: auto`):

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
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
from pathlib import Path
from typing import Any

import datasets

from sftkit.config import DatasetSpec

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
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
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant",
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A problem in the user's data: names the file, the row and what to do."""


@dataclass
class LoadedSource:
    """One data source brought to the canonical `messages`/`text` shape."""

    name: str
    format: str
    dataset: datasets.Dataset  # columns: messages, text, source_row
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)


def read_source(spec: DatasetSpec) -> datasets.Dataset:
    """Load a local file, a folder or a hub dataset with `datasets` (so it is cached and memory-mapped)."""
    path = Path(spec.path)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .parquet or .csv")
        _check_text_file(path)
        if path.suffix.lower() == ".json":
            _check_json_layout(path, spec)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets/pyarrow errors do not say which line is wrong
            raise _explain_load_error(path, err) from None
    elif path.is_dir():
        try:
            ds = datasets.load_dataset(str(path), split=spec.split)
        except Exception as err:
            raise DataError(f"{path}: could not read the folder as a dataset ({err})") from None
    elif spec.path.startswith((".", "/", "~")) or Path(spec.path).suffix.lower() in FILE_BUILDERS:
        raise DataError(f"{spec.path}: file not found; check `path` under `datasets` (or `eval_dataset`) in your config, "
                        "relative to the directory you run sftkit from")
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
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {line_number}: not UTF-8 text (byte {err.object[err.start]:#x} at column {err.start + 1}); "
                    "re-save the file as UTF-8") from None
            has_content = has_content or bool(line.strip())
    if not has_content:
        raise DataError(f"{path}: the file is empty; add rows to it, or point `datasets[].path` at the right file")


def _check_json_layout(path: Path, spec: DatasetSpec) -> None:
    """A .json file holds a list of row objects or one object per line, not rows nested under a key."""
    if _starts_with(path, "["):
        return
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return  # JSON Lines in a .json file (or broken JSON, explained after the load fails)
    layout = "a list of JSON objects (one per row), or one JSON object per line"
    if not isinstance(value, dict):
        raise DataError(f"{path}: the top level is a JSON {type(value).__name__}; expected {layout}")
    row_columns = {"messages", "conversations", *spec.columns.values()}
    nested = [key for key, item in value.items() if key not in row_columns
              and isinstance(item, list) and item and all(isinstance(row, dict) for row in item)]
    if nested:
        raise DataError(f"{path}: the rows are nested under the key '{nested[0]}' of one JSON object; expected {layout}: "
                        f"save the list under '{nested[0]}' as the whole file")


def _explain_load_error(path: Path, err: Exception) -> DataError:
    if path.suffix.lower() == ".jsonl" or (path.suffix.lower() == ".json" and not _starts_with(path, "[")):
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as bad:
                    return DataError(f"{path}: line {line_number}: not valid JSON ({bad.msg} at column {bad.colno}); "
                                     "each line must be one JSON object")
                if not isinstance(value, dict):
                    return DataError(f"{path}: line {line_number}: expected a JSON object per line, got {type(value).__name__}; "
                                     'write each row as one object, e.g. {"messages": [...]}')
    elif path.suffix.lower() == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as bad:
            return DataError(f"{path}: line {bad.lineno}: not valid JSON ({bad.msg} at column {bad.colno})")
        if isinstance(value, list):
            for index, item in enumerate(value, start=1):
                if not isinstance(item, dict):
                    return DataError(f"{path}: row {index}: expected a JSON object, got {type(item).__name__}; "
                                     'each item of the list must be one row object, e.g. {"messages": [...]}')
    return DataError(f"{path}: could not read the file ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}); "
                     "check that every row has the same columns with the same types")


def _starts_with(path: Path, char: str) -> bool:
    with path.open(encoding="utf-8") as handle:
        return handle.read(4096).lstrip().startswith(char)


def detect_format(columns: list[str], spec: DatasetSpec) -> str:
    """Pick the format from the columns (after the user's column mapping)."""
    unknown = [canonical for canonical in spec.columns if not any(canonical in f for f in FORMAT_FIELDS.values())]
    if unknown:
        fields = sorted({f for fs in FORMAT_FIELDS.values() for f in fs})
        raise DataError(f"{spec.path}: `columns` maps '{unknown[0]}', which is no format's column; "
                        f"map one of {fields} to a column of your file")
    absent = {canonical: theirs for canonical, theirs in spec.columns.items() if theirs not in columns}
    if absent:
        canonical, theirs = next(iter(absent.items()))
        raise DataError(f"{spec.path}: `columns` maps {canonical} to '{theirs}', which is not a column of the file "
                        f"(columns: {sorted(columns)}); fix the mapping in `datasets[].columns`")
    mapped = set(spec.columns)
    present = set(columns) | mapped
    if spec.format != "auto":
        missing = [f for f in REQUIRED_FIELDS[spec.format] if f not in present]
        if missing:
            raise DataError(
                f"{spec.path}: format '{spec.format}' needs column(s) {missing}, found {sorted(columns)}; "
                f"map them with `columns:`, e.g. columns: {{{missing[0]}: <your column>}}")
        return spec.format
    for name in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if all(f in present for f in REQUIRED_FIELDS[name]):
            return name
    raise DataError(
        f"{spec.path}: cannot tell the format from columns {sorted(columns)}; set `format:` "
        "(messages, sharegpt, alpaca, prompt_completion, text) and map your columns with `columns:`, "
        "e.g. format: prompt_completion, columns: {prompt: question, completion: answer}")


def row_to_messages(row: dict[str, Any], fmt: str, columns: dict[str, str],
                    system_prompt: str | None) -> tuple[list[dict[str, str]], str, str]:
    """One raw row → (messages, text, error). `error` is empty when the row is good."""

    def get(key: str) -> Any:
        return row.get(columns.get(key, key))

    if fmt == "text":
        text = get("text")
        if not isinstance(text, str) or not text.strip():
            return [], "", "empty or non-string text"
        return [], text, ""
    if fmt in ("messages", "sharegpt"):
        turns = get(FORMAT_FIELDS[fmt][0])
        if not isinstance(turns, list):
            return [], "", f"'{columns.get(FORMAT_FIELDS[fmt][0], FORMAT_FIELDS[fmt][0])}' is not a list of turns"
        role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
        messages = []
        for turn_number, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                return [], "", f"a turn is not an object: turn {turn_number} is of type {type(turn).__name__}"
            role = turn.get(role_key, turn.get("role"))
            content = turn.get(content_key, turn.get("content"))
            if role not in ROLE_ALIASES:
                return [], "", f"unknown role: {role!r} in turn {turn_number} (use system, user or assistant)"
            if not isinstance(content, str):
                return [], "", f"content is not a string: turn {turn_number} ({role}) has content of type {type(content).__name__}"
            messages.append({"role": ROLE_ALIASES[role], "content": content})
    elif fmt == "alpaca":
        instruction, extra, output = get("instruction"), get("input"), get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return [], "", "instruction or output is missing or not a string"
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:  # prompt_completion
        prompt, completion = get("prompt"), get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return [], "", "prompt or completion is missing or not a string"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, "", check_conversation(messages)


def check_conversation(messages: list[dict[str, str]]) -> str:
    """Empty string when the conversation is trainable, else why not."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "a system turn after the first turn"
    if not body:
        return "no user or assistant turn"
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"roles out of order: turn {index + 1} is {message['role']}, expected {expected} (user and assistant must alternate, user first)"
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in body):
        return "empty assistant reply"
    return ""


def load_source(spec: DatasetSpec, system_prompt: str | None, skip_bad_rows: bool,
                num_proc: int = 1) -> LoadedSource:
    """Read one source and normalise it. Bad rows stop the run unless `skip_bad_rows`."""
    raw = read_source(spec)
    if len(raw) == 0:
        raise DataError(f"{spec.path}: the dataset is empty")
    fmt = detect_format(raw.column_names, spec)
    columns = dict(spec.columns)

    def normalise(row: dict[str, Any], index: int) -> dict[str, Any]:
        messages, text, error = row_to_messages(row, fmt, columns, system_prompt)
        return {"messages": messages, "text": text, "error": error, "source_row": index}

    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "text": datasets.Value("string"), "error": datasets.Value("string"), "source_row": datasets.Value("int64"),
    })
    normalised = raw.map(normalise, with_indices=True, remove_columns=raw.column_names, features=features,
                         num_proc=num_proc if len(raw) > 1000 else None, desc=f"Reading {Path(spec.path).name}")
    errors = normalised["error"]
    skipped: dict[str, int] = {}
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        if not skip_bad_rows:
            first = bad[0]
            raise DataError(
                f"{spec.path}: row {first + 1}: {errors[first]}"
                + (f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else "")
                + "; fix the row, or set `skip_bad_rows: true` to skip such rows (they are counted and reported)")
        for i in bad:
            reason = errors[i].split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
        good = set(range(len(errors))) - set(bad)
        normalised = normalised.select(sorted(good))
    normalised = normalised.remove_columns("error")
    if len(normalised) == 0:
        raise DataError(f"{spec.path}: no usable rows left after skipping {sum(skipped.values())} bad rows {skipped}")
    return LoadedSource(name=spec.path, format=fmt, dataset=normalised, rows_read=len(raw), skipped=skipped)
