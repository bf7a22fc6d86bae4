"""Reading and tokenizing in chunks, each with fresh map processes, gives the rows one map gives: the
same tokens and labels in the same order, and row numbers counted over the whole file (in errors too)."""

from __future__ import annotations

import json

import pytest

from sftkit.config import DatasetSpec
from sftkit.data import chunked_map
from sftkit.data.formats import DataError, load_source
from sftkit.data.template import resolve_chat_template
from sftkit.data.tokenize import TokenizeOptions, tokenize_dataset
from tests.conftest import FIXTURES

ROWS = 2500  # above the size that gets several processes
BAD_ROW = 2345  # 1-based, in the second chunk


@pytest.fixture
def chat_file(tmp_path):
    lines = (FIXTURES / "data" / "chat.jsonl").read_text().splitlines()
    rows = [json.loads(lines[i % len(lines)]) for i in range(ROWS)]
    rows[BAD_ROW - 1]["messages"][-1]["content"] = ""  # an empty assistant reply
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chunks_give_the_rows_and_row_numbers_of_one_map(chat_file, tiny_tokenizer, monkeypatch):
    spec = DatasetSpec(path=str(chat_file))
    whole = load_source(spec, None, skip_bad_rows=True, num_proc=1)
    monkeypatch.setattr(chunked_map, "ROWS_PER_PROCESS", 700)  # 2 processes: chunks of 1,400 rows
    with pytest.raises(DataError, match=f"row {BAD_ROW}: empty assistant reply"):
        load_source(spec, None, skip_bad_rows=False, num_proc=2)
    chunked = load_source(spec, None, skip_bad_rows=True, num_proc=2)
    assert chunked.skipped == whole.skipped == {"empty assistant reply": 1}
    assert chunked.dataset["source_row"][:] == [row for row in range(ROWS) if row != BAD_ROW - 1]
    assert chunked.dataset["messages"][:] == whole.dataset["messages"][:]

    options = TokenizeOptions(resolve_chat_template("chatml", tiny_tokenizer), max_seq_length=64)
    one = tokenize_dataset(whole.dataset, tiny_tokenizer, options, num_proc=1)
    two = tokenize_dataset(chunked.dataset, tiny_tokenizer, options, num_proc=2)
    assert one.dropped == two.dropped
    for name in ("input_ids", "labels", "source_row", "trained_tokens"):
        assert one.dataset[name][:] == two.dataset[name][:]
