"""Mixtures by token budget and the online feed: shares by trained tokens, exhaustion, exact resume."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

import sftkit.train.loop as loop
from sftkit.data.examples import TrainingExamples
from sftkit.data.mixture import TokenMixer
from sftkit.data.packing import balanced, packing_efficiency, padding_efficiency
from sftkit.train.feed import OnlineFeed, OnlineOptions, buffer_packs
from sftkit.train.sources import ArrowSource
from tests.train_helpers import assert_same_run, crash_in_step, tiny_config, write_chat_data

IGNORE = -100


def synthetic_examples(sizes: dict[str, tuple[int, int, int]], seed: int = 0) -> TrainingExamples:
    """Per source (name → rows, shortest, longest): random examples, the second half of each trained."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {
        k: [] for k in ("input_ids", "labels", "length", "trained_tokens", "source_row", "source")
    }
    for name, (rows, low, high) in sizes.items():
        for row in range(rows):
            length = int(rng.integers(low, high + 1))
            ids = rng.integers(5, 1000, length).tolist()
            labels = [IGNORE] * (length // 2) + ids[length // 2 :]
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(length)
            columns["trained_tokens"].append(sum(label != IGNORE for label in labels[1:]))
            columns["source_row"].append(row)
            columns["source"].append(name)
    return TrainingExamples.from_dataset(datasets.Dataset.from_dict(columns), list(sizes))


def make_feed(
    examples: TrainingExamples,
    names: list[str],
    weights: tuple[float, ...] | None,
    messages: list[str],
    on_exhausted: str = "repeat",
    buffer: int = 64,
    seed: int = 3,
    packing: bool = True,
) -> OnlineFeed:
    options = OnlineOptions(
        capacity=512,
        packing=packing,
        buffer=buffer,
        micro_batch_size=2,
        accumulation=2,
        world_size=1,
        rank=0,
        seed=seed,
        on_exhausted=on_exhausted,
        weights=weights,
    )
    sources = [
        ArrowSource(examples, np.flatnonzero(examples.sources == i), i, name, seed) for i, name in enumerate(names)
    ]
    return OnlineFeed(sources, options, tell=messages.append)


def step_ids(step) -> list[tuple[int, int]]:
    return [
        (example["source"], example["source_row"]) for rows, _ in step.micro_batches for row in rows for example in row
    ]


def test_mixer_tracks_the_target_shares_at_every_prefix():
    mixer = TokenMixer([3, 1])
    rng = np.random.default_rng(0)
    for pick in range(2000):
        source = mixer.pick()
        mixer.record(source, int(rng.integers(50, 400)) if source == 0 else int(rng.integers(5, 40)))
        if pick >= 40:
            assert abs(mixer.realised()[0] - 0.75) < 0.05, pick
    assert mixer.realised() == pytest.approx([0.75, 0.25], abs=0.002)


def test_mixture_shares_are_trained_tokens_not_rows_at_every_prefix():
    # "long" examples are ~7x longer: a 3:1 mixture by rows would give it ~95% of the trained tokens
    examples = synthetic_examples({"long": (2000, 100, 400), "short": (2000, 10, 60)})
    messages: list[str] = []
    feed = make_feed(examples, ["long", "short"], (3.0, 1.0), messages, buffer=512)
    trained = np.zeros(2)
    worst = 0.0
    for index in range(200):
        trained += feed.draw(index).source_trained
        if index >= 4:  # every prefix of steps from the 5th on
            worst = max(worst, abs(trained[0] / trained.sum() - 0.75))
    shares = trained / trained.sum()
    print(
        f"realised shares after 200 steps: {shares.round(4).tolist()} (target 0.75, 0.25); "
        f"worst prefix from step 5: {worst:.4f}"
    )
    assert shares == pytest.approx([0.75, 0.25], abs=0.02)
    assert worst < 0.02
    assert any("short ran out" in m for m in messages)  # the short source repeats, and the run says so


def test_on_exhausted_stop_trains_what_was_read_then_ends():
    examples = synthetic_examples({"a": (30, 50, 200), "b": (30, 50, 200)})
    messages: list[str] = []
    feed = make_feed(examples, ["a", "b"], (1.0, 1.0), messages, on_exhausted="stop", buffer=16)
    seen: list[tuple[int, int]] = []
    for index in range(1000):
        step = feed.draw(index)
        if step is None:
            break
        seen += step_ids(step)
    assert step is None and index < 1000
    assert len(seen) == len(set(seen))  # nothing repeated
    resumed = make_feed(examples, ["a", "b"], (1.0, 1.0), [], on_exhausted="stop", buffer=16)
    resumed.load_state(feed.state_for(index))  # a checkpoint of the run's end holds an empty queue
    assert resumed.draw(index) is None
    assert any("ran out" in m and "on_exhausted: stop" in m for m in messages)


@pytest.mark.parametrize("stop_at", [1, 7, 13])
def test_feed_state_resumes_the_very_same_steps(stop_at):
    examples = synthetic_examples({"a": (120, 30, 300), "b": (50, 10, 80)})
    straight = make_feed(examples, ["a", "b"], (2.0, 1.0), [], buffer=24)
    expected = [step_ids(straight.draw(i)) for i in range(30)]

    first = make_feed(examples, ["a", "b"], (2.0, 1.0), [], buffer=24)
    for i in range(stop_at):
        first.draw(i)
    first.draw(stop_at)  # a step drawn but not applied (a crash mid-step) saves the state before it
    plain, tensors = first.state_for(stop_at)
    plain = json.loads(json.dumps(plain))  # through the checkpoint's JSON

    resumed = make_feed(examples, ["a", "b"], (2.0, 1.0), [], buffer=24)
    resumed.load_state((plain, tensors))
    assert [step_ids(resumed.draw(i)) for i in range(stop_at, 30)] == expected[stop_at:]


def test_online_feed_without_weights_takes_turns_by_rows_and_never_duplicates_within_a_pass():
    examples = synthetic_examples({"a": (40, 30, 100), "b": (40, 30, 100)})
    feed = make_feed(examples, ["a", "b"], None, [], buffer=80, on_exhausted="stop")
    seen = []
    index = 0
    while (step := feed.draw(index)) is not None:
        seen += step_ids(step)
        index += 1
    assert sorted(seen) == sorted((s, r) for s in (0, 1) for r in range(40))  # every example exactly once


@pytest.mark.slow
def test_a_mixture_run_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    chat = write_chat_data(tmp_path / "chat.jsonl", rows=40, seed=1)
    other = write_chat_data(tmp_path / "other.jsonl", rows=15, seed=2)
    settings = dict(
        datasets=[{"path": str(chat), "weight": 3}, {"path": str(other), "weight": 1}],
        packing_buffer=12,
        max_steps=8,
        save_steps=3,
    )
    loop.train(tiny_config(tiny_model_dir, chat, tmp_path / "straight", **settings))
    with crash_in_step(monkeypatch, 5), pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(tiny_config(tiny_model_dir, chat, tmp_path / "crashed", **settings))
    assert (tmp_path / "crashed" / "checkpoint-3" / "data_state.json").is_file()
    result = loop.train(
        tiny_config(tiny_model_dir, chat, tmp_path / "crashed", resume_from_checkpoint=True, **settings)
    )
    assert result.last_step == 8
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", 8, "mixture resumed after a crash")


def test_packing_per_buffer_is_within_a_point_of_packing_everything():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(6.0, 0.8, 40_000).astype(np.int64) + 8, 2048)
    offline = packing_efficiency(lengths, balanced(lengths, 2048), 4)
    sequence_lengths = []
    for refill, start in enumerate(range(0, len(lengths), 2000)):
        chunk = lengths[start : start + 2000]
        sequence_lengths += buffer_packs(chunk, 2048, True, refill).sequence_lengths(chunk).tolist()
    online = padding_efficiency(sequence_lengths, 4)  # micro-batches of 4 in the queue's order
    print(f"packing efficiency: offline {offline:.4f}, per buffer of 2,000 {online:.4f}")
    assert online > offline - 0.01
