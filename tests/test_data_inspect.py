"""`sftkit data inspect`: the figures a user reads before training, on real data with the real
tokenizer when ../shared has them, and on a small fixture with the tiny tokenizer otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.data.template import IGNORE_INDEX, resolve_chat_template, tokenize_conversation
from tests.conftest import FIXTURES, GSM8K, LLAMA2_TOKENIZER, SHAREGPT, requires

CHAT = FIXTURES / "data" / "chat.jsonl"


def write_config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "inspect.yaml"
    path.write_text(yaml.safe_dump(keys), encoding="utf-8")
    return path


def inspect(config: Path, *args: str, exit_code: int = 0):
    result = CliRunner().invoke(app, ["data", "inspect", str(config), *args])
    assert result.exit_code == exit_code, result.output
    return result


def llama2_config(tmp_path: Path, dataset: dict) -> Path:
    return write_config(
        tmp_path,
        model_name_or_path=str(LLAMA2_TOKENIZER),
        chat_template="llama2",
        max_seq_length=2048,
        datasets=[dataset],
    )


def trained_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


@pytest.fixture
def private_datasets_cache(tmp_path, monkeypatch) -> Path:
    """A datasets cache of the test's own, so what it finds there was written by this test."""
    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture
def chat_config(tmp_path, tiny_tokenizer_dir) -> Path:
    return write_config(
        tmp_path,
        model_name_or_path=str(tiny_tokenizer_dir),
        chat_template="chatml",
        max_seq_length=1024,
        per_device_train_batch_size=2,
        datasets=[{"path": str(CHAT)}],
    )


@requires(LLAMA2_TOKENIZER)
@requires(GSM8K)
def test_gsm8k_packs_almost_without_waste_and_dumps_masked_examples(tmp_path, llama2_tokenizer):
    test_split = GSM8K / "test.jsonl"  # the 1319-row split keeps this test a few seconds long
    config = llama2_config(
        tmp_path,
        {
            "path": str(test_split),
            "format": "prompt_completion",
            "columns": {"prompt": "question", "completion": "answer"},
        },
    )
    dump = tmp_path / "dump.jsonl"
    result = inspect(config, "--json", "--dump", "4", str(dump))
    stats = json.loads(result.stdout)  # stdout is the JSON document alone, even with --dump
    assert f"wrote 4 examples to {dump}" in result.stderr
    assert stats["sources"] == [
        {
            "path": str(test_split),
            "format": "prompt_completion",
            "rows": 1319,
            "skipped": {},
            "examples": 1319,
            "tokens": stats["total_tokens"],
            "trained_tokens": stats["trained_tokens"],
            "trained_share": 1.0,
        }
    ]
    assert stats["train_examples"] == 1319
    assert stats["truncated_examples"] == 0 and stats["dropped_examples"] == {}
    assert stats["packing_efficiency"] >= 0.99
    assert stats["padding_waste"] > stats["packing_waste"]
    assert 0 < stats["trained_tokens"] < stats["total_tokens"]

    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    originals = [json.loads(line) for line in test_split.read_text().splitlines()[:4]]
    assert [row["row"] for row in rows] == [1, 2, 3, 4]
    for row, original in zip(rows, originals, strict=True):
        assert len(row["input_ids"]) == len(row["labels"])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"], strict=True))
        assert (
            trained_text(llama2_tokenizer, row["input_ids"], row["labels"]).strip()
            == f"{original['answer'].strip()} </s>"
        )
        assert llama2_tokenizer.decode(row["input_ids"]).startswith(f"<s>[INST] {original['question'].strip()} [/INST]")


@requires(LLAMA2_TOKENIZER)
@requires(SHAREGPT)
def test_sharegpt_packs_almost_without_waste(tmp_path):
    config = llama2_config(tmp_path, {"path": str(SHAREGPT)})
    stats = json.loads(inspect(config, "--json").stdout)
    assert stats["sources"] == [
        {
            "path": str(SHAREGPT),
            "format": "sharegpt",
            "rows": 500,
            "skipped": {},
            "examples": 500,
            "tokens": stats["total_tokens"],
            "trained_tokens": stats["trained_tokens"],
            "trained_share": 1.0,
        }
    ]
    assert (stats["train_examples"], stats["dropped_examples"]) == (500, {})
    assert stats["packing_efficiency"] >= 0.99
    assert stats["padding_waste"] > stats["packing_waste"]


def test_dump_writes_the_tokenized_examples_with_masked_labels(
    tmp_path, chat_config, tiny_tokenizer, private_datasets_cache
):
    dump = tmp_path / "dump.jsonl"
    inspect(chat_config, "--dump", "3", str(dump))
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    template = resolve_chat_template("chatml", tiny_tokenizer)
    originals = [json.loads(line)["messages"] for line in CHAT.read_text().splitlines()[:3]]
    assert [(row["source"], row["row"]) for row in rows] == [(str(CHAT), 1), (str(CHAT), 2), (str(CHAT), 3)]
    for row, messages in zip(rows, originals, strict=True):
        expected = tokenize_conversation(messages, template, tiny_tokenizer)
        assert (row["input_ids"], row["labels"]) == (expected["input_ids"], expected["labels"])
        assert IGNORE_INDEX in row["labels"]
        replies = [f"{m['content']}<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert trained_text(tiny_tokenizer, row["input_ids"], row["labels"]) == "".join(replies)


def test_tokenization_is_served_from_the_cache_on_a_second_run(chat_config, private_datasets_cache):
    first = json.loads(inspect(chat_config, "--json").stdout)
    assert (first["train_examples"], first["truncated_examples"]) == (24, 0)
    cached = {path: path.stat().st_mtime_ns for path in private_datasets_cache.rglob("cache-*.arrow")}
    assert len(cached) >= 2  # the normalised rows and the tokenized rows
    second = json.loads(inspect(chat_config, "--json").stdout)
    assert {path: path.stat().st_mtime_ns for path in private_datasets_cache.rglob("cache-*.arrow")} == cached
    first.pop("timings"), second.pop("timings")  # wall times differ between runs; every figure must not
    assert second == first


def test_human_readable_report_and_cli_overrides(chat_config, private_datasets_cache):
    output = inspect(chat_config, "--max_seq_length", "128").stdout
    for title in (
        "Data sources",
        "Token lengths (24 train examples, 0 eval)",
        "Training tokens and waste",
        "packs of <= 128",
        "First example",
    ):  # 128: the command-line value, not the file's 1024
        assert title in output
    assert "Answer 0.0: the quick brown fox" in output


def test_missing_data_file_is_a_clean_error(tmp_path, tiny_tokenizer_dir):
    config = write_config(
        tmp_path,
        model_name_or_path=str(tiny_tokenizer_dir),
        chat_template="chatml",
        datasets=[{"path": str(tmp_path / "absent.jsonl")}],
    )
    result = inspect(config, exit_code=2)
    assert "error:" in result.output and "absent.jsonl" in result.output and "Traceback" not in result.output


def test_inspect_of_a_mixture_says_what_share_each_source_has_and_gets(tmp_path, tiny_tokenizer_dir):
    from tests.train_helpers import write_chat_data

    long = write_chat_data(tmp_path / "long.jsonl", rows=40, seed=1)
    short = write_chat_data(tmp_path / "short.jsonl", rows=10, seed=2)
    config = write_config(
        tmp_path,
        model_name_or_path=str(tiny_tokenizer_dir),
        chat_template="chatml",
        max_seq_length=512,
        max_steps=10,
        datasets=[{"path": str(long), "weight": 1}, {"path": str(short), "weight": 1}],
    )
    stats = json.loads(inspect(config, "--json").stdout)
    rows = {Path(s["path"]).stem: s for s in stats["sources"]}
    assert rows["long"]["examples"] == 40 and rows["short"]["examples"] == 10
    assert rows["long"]["trained_tokens"] + rows["short"]["trained_tokens"] == stats["trained_tokens"]
    assert rows["long"]["trained_share"] + rows["short"]["trained_share"] == pytest.approx(1)
    for row in rows.values():  # 1:1 by trained tokens: the smaller source is drawn more often than its size gives
        assert row["target_share"] == 0.5 and row["rate"] == pytest.approx(0.5 / row["trained_share"])
    assert rows["short"]["rate"] > 1 > rows["long"]["rate"]
    text = inspect(config).stdout
    assert "target" in text and "short.jsonl" in text
