"""Streamed sources: the rows of `load_source`, in order, from a position that survives a checkpoint.

Every file type and folders of shards are read both ways; a stream stopped after k rows, saved through
JSON and loaded into a fresh stream continues with exactly the rows the uninterrupted stream gives.
"""

from __future__ import annotations

import csv
import json
import shutil
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.config import DatasetSpec
from sftkit.data.formats import DataError, load_source
from sftkit.data.stream import DETECTION_ROWS, SourceStream
from tests.conftest import FIXTURES
from tests.test_bad_inputs import CASES, ERROR_CASES, OK_CASES, _run_case
from tests.test_tools_reasoning import TOOLS, WEATHER, call

CHAT_ROWS = [json.loads(line) for line in (FIXTURES / "data" / "chat.jsonl").read_text().splitlines()]  # 24 rows
ROW_GROUP = 5
SHARDS = 3  # folders hold 3 shards of 8 rows: positions 8 and 16 are shard boundaries
STOPS = [0, 1, 5, 7, 8, 9, 10, 16, 23, 24]  # rows read before saving: row-group and shard boundaries, the end


def write_jsonl(path: Path, rows: list[dict], blank_line_at: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "")  # blank lines are no rows, in both readers
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=ROW_GROUP)
    return path


def qa_rows() -> list[dict]:
    """prompt/completion rows with the cells CSV makes hard: commas, quotes, line breaks, non-ASCII."""
    return [
        {
            "question": f'Question {i}, with a comma and "quotes"?',
            "answer": f"Answer {i}: café\nsecond line" if i % 3 == 0 else f"Answer {i}",
        }
        for i in range(24)
    ]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_folder(path: Path, rows: list[dict], write, suffix: str) -> Path:
    path.mkdir()
    size = len(rows) // SHARDS
    for shard in range(SHARDS):
        write(path / f"part-{shard}.{suffix}", rows[shard * size : (shard + 1) * size])
    return path


def write_text_folder(path: Path, rows: list[dict], suffix: str) -> Path:
    """.txt shards: a folder our readers do not open, read through the `datasets` stream (as hub ids are)."""
    path.mkdir()
    for shard in range(SHARDS):
        lines = [row["messages"][-1]["content"] for row in rows[shard * 8 : (shard + 1) * 8]]
        (path / f"part-{shard}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


QA = {"format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}}
SOURCES = {
    "jsonl": lambda tmp: ({"path": str(write_jsonl(tmp / "chat.jsonl", CHAT_ROWS, blank_line_at=6))}),
    "json_lines": lambda tmp: ({"path": str(write_jsonl(tmp / "chat.json", CHAT_ROWS))}),
    "json_list": lambda tmp: ({"path": str(tmp / "chat.json")}, (tmp / "chat.json").write_text(json.dumps(CHAT_ROWS)))[
        0
    ],
    "parquet": lambda tmp: ({"path": str(write_parquet(tmp / "chat.parquet", CHAT_ROWS))}),
    "csv": lambda tmp: ({"path": str(write_csv(tmp / "qa.csv", qa_rows())), **QA}),
    "jsonl_shards": lambda tmp: ({"path": str(write_folder(tmp / "chat", CHAT_ROWS, write_jsonl, "jsonl"))}),
    "parquet_shards": lambda tmp: ({"path": str(write_folder(tmp / "chat", CHAT_ROWS, write_parquet, "parquet"))}),
    "csv_shards": lambda tmp: ({"path": str(write_folder(tmp / "qa", qa_rows(), write_csv, "csv")), **QA}),
    "text_shards_via_datasets": lambda tmp: ({"path": str(write_text_folder(tmp / "text", CHAT_ROWS, "txt"))}),
}


@pytest.fixture(params=list(SOURCES))
def source(request, tmp_path) -> tuple[DatasetSpec, list[dict]]:
    """A source of 24 rows and the rows `load_source` reads from it."""
    spec = DatasetSpec(**SOURCES[request.param](tmp_path))
    offline = list(load_source(spec, "Be brief.", skip_bad_rows=False).dataset)
    assert len(offline) == 24
    return spec, offline


def stream(spec: DatasetSpec, skip_bad_rows: bool = False) -> SourceStream:
    return SourceStream(spec, "chat", system_prompt="Be brief.", skip_bad_rows=skip_bad_rows)


def test_stream_gives_the_offline_rows_in_order(source):
    spec, offline = source
    streamed = stream(spec)
    assert list(streamed) == offline
    assert streamed.format == load_source(spec, None, False).format
    assert (streamed.rows_read, streamed.skipped) == (24, {})


def test_resume_from_a_saved_position_gives_the_rows_of_the_uninterrupted_stream(source):
    spec, offline = source
    for stop in STOPS:
        first = stream(spec)
        head = list(islice(iter(first), stop))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = stream(spec)
        resumed.load_state_dict(state)
        assert head + list(resumed) == offline, f"stopped after {stop} rows"
        assert resumed.rows_read == 24


def test_restart_reads_the_next_pass_from_row_zero_and_resumes_within_it(source):
    spec, offline = source
    first = stream(spec)
    assert list(first) == offline
    assert list(first) == []  # the pass is over until restarted
    first.restart()
    head = list(islice(iter(first), 9))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["position"]["pass_number"] == 1 and state["rows_read"] == 24 + 9
    resumed = stream(spec)
    resumed.load_state_dict(state)
    assert head + list(resumed) == offline
    assert resumed.pass_number == 1


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_resume_seeks_to_its_row_without_reading_the_rows_before_it(tmp_path, suffix):
    """After saving at row 200 of 240, rows 101 to 200 are overwritten with bytes no reader accepts: a resume
    that read them again would fail. (A stream reads the first DETECTION_ROWS rows, and a CSV header, when
    built: the format comes from their columns.)"""
    rows = CHAT_ROWS * 10 if suffix == "jsonl" else qa_rows() * 10
    path = write_jsonl(tmp_path / "chat.jsonl", rows) if suffix == "jsonl" else write_csv(tmp_path / "qa.csv", rows)
    spec = DatasetSpec(path=str(path), **({} if suffix == "jsonl" else QA))
    expected = list(stream(spec))

    def cursor_after(rows_read: int) -> tuple[int, dict]:
        reader = stream(spec)
        list(islice(iter(reader), rows_read))
        state = reader.state_dict()
        return state["position"]["cursor"]["byte"], state

    kept, _ = cursor_after(DETECTION_ROWS)
    offset, state = cursor_after(200)
    data = path.read_bytes()
    path.write_bytes(data[:kept] + b"\xff" * (offset - kept - 1) + b"\n" + data[offset:])
    with pytest.raises(DataError, match="not UTF-8"):
        list(stream(spec))  # the damage is real
    resumed = stream(spec)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[200:]


def test_tool_calls_stream_like_the_offline_reader_whatever_their_argument_keys(tmp_path):
    """Arrow merges the argument keys and types of all rows into one schema offline; the stream reads each
    row alone. Both give the same rows: keys in the row's own order, numbers as written."""

    def tool_row(arguments: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call("f", arguments)]},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "ok"},
            ]
        }

    rows = [
        tool_row({"a": 1, "b": 2}),
        tool_row({"b": 3, "a": 4}),
        tool_row({"x": 1.5}),
        tool_row({"x": 2}),
        {"messages": WEATHER[:4], "tools": TOOLS},
    ]
    spec = DatasetSpec(path=str(write_jsonl(tmp_path / "tools.jsonl", rows)))
    assert list(stream(spec)) == list(load_source(spec, "Be brief.", skip_bad_rows=False).dataset)


def test_format_and_column_mapping_hold_when_the_first_row_leaves_an_optional_column_out(tmp_path):
    rows = [{"task": "Say hi.", "reply": "Hi."}, {"task": "Add.", "context": "2 and 3", "reply": "5"}]
    spec = DatasetSpec(
        path=str(write_jsonl(tmp_path / "alpaca.jsonl", rows)),
        format="auto",
        columns={"instruction": "task", "input": "context", "output": "reply"},
    )
    streamed = stream(spec)
    assert list(streamed) == list(load_source(spec, "Be brief.", skip_bad_rows=False).dataset)
    assert streamed.format == "alpaca"


def test_bad_row_stops_with_the_offline_error(tmp_path):
    rows = [
        *CHAT_ROWS[:2],
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
        *CHAT_ROWS[2:],
    ]
    spec = DatasetSpec(path=str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    with pytest.raises(DataError) as offline:
        load_source(spec, None, skip_bad_rows=False)
    streamed = stream(spec)
    received = []
    with pytest.raises(DataError) as error:
        received.extend(streamed)
    assert str(error.value) == str(offline.value)
    assert "chat.jsonl: row 3: unknown role: 'bot'" in str(error.value) and "skip_bad_rows" in str(error.value)
    assert len(received) == 2  # the rows before it were given


def test_bad_row_in_a_shard_names_the_shard_file_and_its_row(tmp_path):
    rows = list(CHAT_ROWS)
    rows[8 + 3] = {"messages": [{"role": "user", "content": "Hi"}]}
    spec = DatasetSpec(path=str(write_folder(tmp_path / "chat", rows, write_jsonl, "jsonl")))
    with pytest.raises(DataError, match=r"chat/part-1\.jsonl: row 4: no assistant turn"):
        list(stream(spec))


def test_skip_bad_rows_counts_by_reason_like_the_offline_reader_and_across_a_resume(tmp_path):
    spec = DatasetSpec(path=str(CASES / "skip_bad_rows_counts" / "data.jsonl"))
    offline = load_source(spec, "Be brief.", skip_bad_rows=True)
    assert list(stream(spec, skip_bad_rows=True)) == list(offline.dataset)
    first = stream(spec, skip_bad_rows=True)
    head = list(islice(iter(first), 2))  # rows 1 and 3 kept, 2 skipped
    state = json.loads(json.dumps(first.state_dict()))
    assert state["skipped"] == {"unknown role": 1}
    resumed = stream(spec, skip_bad_rows=True)
    resumed.load_state_dict(state)
    assert head + list(resumed) == list(offline.dataset)
    assert (
        resumed.skipped
        == offline.skipped
        == {"unknown role": 2, "empty assistant reply": 1, "roles out of order": 1, "no assistant turn": 1}
    )
    assert resumed.rows_read == offline.rows_read == 8


def test_a_state_saved_on_other_data_is_refused(tmp_path):
    spec = DatasetSpec(path=str(write_folder(tmp_path / "chat", CHAT_ROWS, write_jsonl, "jsonl")))
    first = stream(spec)
    list(islice(iter(first), 3))
    state = first.state_dict()
    write_jsonl(tmp_path / "chat" / "part-3.jsonl", CHAT_ROWS[:2])
    with pytest.raises(DataError, match="the source changed since its position was saved"):
        stream(spec).load_state_dict(state)


DATA_CASES = [
    "jsonl_malformed_line",
    "jsonl_line_is_list",
    "non_utf8_bytes",
    "json_top_level_dict",
    "json_top_level_string",
    "json_list_item_not_object",
    "empty_file",
    "unsupported_extension",
    "data_file_not_found",
    "unknown_role",
    "messages_not_a_list",
    "turn_not_an_object",
    "missing_columns_for_format",
    "column_mapping_to_missing_column",
    "unknown_columns_auto_format",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_files_give_the_offline_error_word_for_word(case, monkeypatch):
    monkeypatch.chdir(CASES / case)  # the configs name their files relative to their folder
    spec = DatasetSpec(**yaml.safe_load((CASES / case / "config.yaml").read_text())["datasets"][0])
    with pytest.raises(DataError) as offline:
        load_source(spec, None, skip_bad_rows=False)
    with pytest.raises(DataError) as streamed:
        list(stream(spec))
    assert str(streamed.value) == str(offline.value)


def _is_mapping(config: Path) -> bool:
    try:
        return isinstance(yaml.safe_load(config.read_text(encoding="utf-8")), dict)
    except yaml.YAMLError:
        return False


# A stream cannot hold rows out for eval: that config has its own error (tests/test_mixture_config.py).
STREAMABLE_CASES = [
    case for case in ERROR_CASES if _is_mapping(case / "config.yaml") and case.name != "eval_split_holds_out_nothing"
]


def streamed_case(case: Path, tmp_path: Path) -> Path:
    """A copy of a corpus case whose config streams its data."""
    streamed = shutil.copytree(case, tmp_path / "streamed" / case.name)
    text = (streamed / "config.yaml").read_text(encoding="utf-8")
    with (streamed / "config.yaml").open("a", encoding="utf-8") as config:  # a stream needs max_steps
        config.write("\nstreaming: true\n" + ("" if "max_steps" in text else "max_steps: 10\n"))
    return streamed


@pytest.mark.parametrize("case", STREAMABLE_CASES, ids=[p.name for p in STREAMABLE_CASES])
def test_bad_input_corpus_gives_its_clear_error_on_a_streaming_config(case, tmp_path, tiny_tokenizer_dir, monkeypatch):
    result = _run_case(streamed_case(case, tmp_path), tmp_path, tiny_tokenizer_dir, monkeypatch)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    missing = [
        s for s in (case / "expected.txt").read_text(encoding="utf-8").splitlines() if s and s not in result.output
    ]
    assert not missing, f"the error does not mention {missing}:\n{result.output}"


@pytest.mark.parametrize("case", OK_CASES, ids=[p.name for p in OK_CASES])
def test_skipped_rows_are_counted_by_reason_on_a_streaming_config(case, tmp_path, tiny_tokenizer_dir, monkeypatch):
    result = _run_case(streamed_case(case, tmp_path), tmp_path, tiny_tokenizer_dir, monkeypatch, "--json")
    assert result.exit_code == 0, f"{result.exception!r}\n{result.output}"
    stats = json.loads(result.stdout[result.stdout.index("{") :])
    expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    assert {key: stats[key] for key in expected} == expected
    assert stats["sample"]["rows_per_source"] == 1000


def inspect_json(tmp_path: Path, tokenizer_dir: Path, data: Path, *args: str, **keys) -> dict:
    config = tmp_path / f"inspect-{len(list(tmp_path.glob('inspect-*')))}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tokenizer_dir),
                "chat_template": "chatml",
                "max_seq_length": 512,
                "max_steps": 10,
                "datasets": [{"path": str(data)}],
                **keys,
            }
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["data", "inspect", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_on_a_streaming_config_reports_the_first_rows_of_each_source(tmp_path, tiny_tokenizer_dir):
    big = write_jsonl(tmp_path / "big.jsonl", CHAT_ROWS * 50)  # 1200 rows: more than the default sample
    stats = inspect_json(tmp_path, tiny_tokenizer_dir, big, streaming=True)
    assert stats["sample"]["rows_per_source"] == 1000
    assert "first 1000 rows of each source" in stats["sample"]["note"]
    assert stats["sources"][0]["rows"] == stats["train_examples"] == 1000

    sampled = inspect_json(tmp_path, tiny_tokenizer_dir, big, "--sample_rows", "30", streaming=True)
    head = write_jsonl(tmp_path / "head.jsonl", (CHAT_ROWS * 2)[:30])
    whole = inspect_json(tmp_path, tiny_tokenizer_dir, head)  # the same 30 rows, read offline
    assert "sample" not in whole
    for figures in (sampled, whole):
        figures.pop("timings"), figures.pop("sample", None), figures.pop("sources")
    assert sampled == whole

    config = tmp_path / "human.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_tokenizer_dir),
                "chat_template": "chatml",
                "streaming": True,
                "max_steps": 10,
                "datasets": [{"path": str(big)}],
            }
        )
    )
    output = CliRunner().invoke(app, ["data", "inspect", str(config), "--sample_rows", "30"]).output
    assert "the figures below come from the first 30 rows of each source" in " ".join(output.split())
