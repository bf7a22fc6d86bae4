"""The tokenize map is keyed without pickling the tokenizer, yet a changed tokenizer, template or
option never reuses another's cached tokens, and several map processes give the rows one process gives."""

from __future__ import annotations

import json

import datasets

from sftkit.data.examples import column
from sftkit.data.template import resolve_chat_template
from sftkit.data.tokenize import TokenizeOptions, tokenize_dataset, tokenize_fingerprint
from sftkit.model.load import load_tokenizer
from tests.conftest import FIXTURES


def chat_rows(repeat: int = 1) -> datasets.Dataset:
    lines = (FIXTURES / "data" / "chat.jsonl").read_text().splitlines() * repeat
    messages = [json.loads(line)["messages"] for line in lines]
    return datasets.Dataset.from_dict(
        {
            "messages": messages,
            "text": [""] * len(messages),
            "source_row": list(range(len(messages))),
            "source": ["chat"] * len(messages),
        }
    )


def test_fingerprint_follows_tokenizer_template_and_options(tiny_tokenizer_dir):
    rows = chat_rows()
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    options = TokenizeOptions(resolve_chat_template("chatml", tokenizer), max_seq_length=1024)
    key = tokenize_fingerprint(rows, tokenizer, options)
    assert tokenize_fingerprint(rows, load_tokenizer(str(tiny_tokenizer_dir)), options) == key  # same on every rank
    assert tokenize_fingerprint(rows, tokenizer, TokenizeOptions(options.template, max_seq_length=512)) != key
    assert (
        tokenize_fingerprint(rows, tokenizer, TokenizeOptions(resolve_chat_template("zephyr", tokenizer), 1024)) != key
    )
    assert tokenize_fingerprint(rows.select(range(3)), tokenizer, options) != key
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenize_fingerprint(rows, tokenizer, options) != key


def test_two_map_processes_tokenize_like_one(tiny_tokenizer):
    rows = chat_rows(repeat=60)  # 1,440 rows: above the size that gets several processes
    options = TokenizeOptions(resolve_chat_template("chatml", tiny_tokenizer), max_seq_length=64)
    one = tokenize_dataset(rows, tiny_tokenizer, options, num_proc=1)
    two = tokenize_dataset(rows, tiny_tokenizer, options, num_proc=2)
    assert one.dropped == two.dropped
    assert one.dataset["input_ids"][:] == two.dataset["input_ids"][:]
    assert one.dataset["labels"][:] == two.dataset["labels"][:]
    assert column(one.dataset, "trained_tokens").tolist() == [
        sum(label != -100 for label in labels[1:]) for labels in one.dataset["labels"]
    ]
