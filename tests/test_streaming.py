"""Streaming runs: the same training as tokenizing first, and an exact resume mid-stream (crash or SIGKILL)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

import sftkit.train.loop as loop
from sftkit.data.formats import DataError
from tests.test_faults import resume_in_process, resumed_step, run_and_signal, write_yaml
from tests.train_helpers import assert_same_run, crash_in_step, tiny_config, write_chat_data

pytestmark = pytest.mark.slow

ROWS = 48  # write_chat_data's conversations all fit max_seq_length 256: none is dropped


def test_streaming_trains_exactly_like_tokenizing_first(tmp_path, tiny_model_dir):
    """One source in file order and a buffer of one whole pass: the packs and their order are the offline
    run's, so every logged loss and the final weights are the same."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=ROWS)
    settings = dict(max_steps=4, save_steps=100, lora_dropout=0.0)
    offline = loop.train(tiny_config(tiny_model_dir, data, tmp_path / "offline", **settings))
    streamed = loop.train(
        tiny_config(tiny_model_dir, data, tmp_path / "streamed", streaming=True, packing_buffer=ROWS, **settings)
    )
    assert offline.last_step == streamed.last_step == 4
    sequences = json.loads((tmp_path / "offline" / "run.json").read_text())["sequences"]
    assert sequences >= 4 * 2 * 2  # the 4 steps stay inside the first epoch of the offline run
    assert_same_run(tmp_path / "offline", tmp_path / "streamed", 4, "streamed vs tokenized first")


STREAM = dict(streaming=True, packing_buffer=10, max_steps=8, save_steps=3)  # buffers of 10: a refill every step or two


def test_a_stream_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """Tokenized by 2 processes, chunks of 64 rows ahead of training: the checkpoint is taken while later
    chunks are in flight, and the resumed run reads them again."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=200)
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "straight", **STREAM))  # tokenized in-process
    workers = dict(STREAM, dataset_num_proc=2)
    with crash_in_step(monkeypatch, 5), pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", **workers))
    state = json.loads((tmp_path / "crashed" / "checkpoint-3" / "data_state.json").read_text())
    position = state["sources"][0]["position"]
    assert position["stream"]["position"]["source_row"] == 64 and position["given"] < 64  # chunk 2 on: read again
    result = loop.train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", resume_from_checkpoint=True, **workers))
    assert result.last_step == 8
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", 8, "stream resumed after a crash")


def test_sigkill_mid_stream_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=30)  # read about twice in 8 steps: resume crosses a repeat
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "straight", **STREAM))
    output_dir = tmp_path / "run"
    config_path = write_yaml(tiny_config(tiny_model_dir, data, output_dir, **STREAM), tmp_path / "run.yaml")
    killed, seen = run_and_signal(
        config_path,
        output_dir,
        lambda out: (out / "checkpoint-3").is_dir() and (out / "metrics.jsonl").read_text().count("\n") >= 5,
        signal.SIGKILL,
        {"SFTKIT_TEST_STEP_DELAY": "0.3"},
    )
    assert killed.returncode == -signal.SIGKILL and "checkpoint-3" in seen["checkpoints"]
    resumed, console_text = resume_in_process(
        tiny_config(tiny_model_dir, data, output_dir, resume_from_checkpoint=True, **STREAM)
    )
    assert resumed_step(console_text) in (3, 6) and resumed.last_step == 8
    assert_same_run(tmp_path / "straight", output_dir, 8, f"stream resumed after SIGKILL at step {seen['last_step']}")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_row_met_while_streaming_names_the_file_and_row(workers, tmp_path, tiny_model_dir):
    """truncation: error on a row of a stream stops the run with the offline error, tokenized in-process or not."""
    case = Path(__file__).parent / "bad_inputs" / "too_long_with_truncation_error"
    data = tmp_path / "data.jsonl"
    data.write_text((case / "data.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    config = tiny_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        streaming=True,
        truncation="error",
        max_seq_length=100,
        dataset_num_proc=workers,
        max_steps=2,
    )
    with pytest.raises(DataError) as error:
        loop.train(config)
    for expected in (case / "expected.txt").read_text(encoding="utf-8").splitlines():
        assert expected in str(error.value)
