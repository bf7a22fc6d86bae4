"""Loss per training source: the collator's target sources, the loss module's per-source sums, and
the per-source figures of a real run's metrics rows, recomputed example by example."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sftkit.train.loop as loop
from sftkit.data.collate import collate
from sftkit.train.forward import CausalLMLoss
from sftkit.train.loss import chunked_cross_entropy, sum_by_source, token_cross_entropy
from sftkit.train.metrics import accumulate_sources, empty_window, source_figures
from sftkit.train.sinks import flat_scalars
from tests.train_helpers import tiny_config, write_chat_data

IGNORE = -100


def example(ids: list[int], labels: list[int], source: int) -> dict:
    return {"input_ids": ids, "labels": labels, "source": source}


def test_collate_marks_the_source_of_every_target_and_nothing_else():
    a = example([11, 12, 13], [IGNORE, 12, 13], source=0)
    b = example([21, 22], [IGNORE, 22], source=1)
    c = example([31, 32, 33, 34], [IGNORE, IGNORE, 33, 34], source=2)
    batch = collate([[a, b], [c]], pad_token_id=0)
    assert batch["targets"].tolist() == [[12, 13, IGNORE, 22, IGNORE], [IGNORE, 33, 34, IGNORE, IGNORE]]
    assert batch["target_sources"].tolist() == [[0, 0, -1, 1, -1], [-1, 2, 2, -1, -1]]
    unlabelled = collate([[{"input_ids": [1, 2], "labels": [1, 2]}]], pad_token_id=0)  # no source: source 0
    assert unlabelled["target_sources"].tolist() == [[0, -1]]


def random_examples(vocab: int, lengths: list[int], sources: int, seed: int = 1) -> list[dict]:
    """Examples with their first third masked, from sources 0..sources-1 in turn."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        examples.append(example(ids, [IGNORE] * (n // 3) + ids[n // 3 :], source=index % sources))
    return examples


def test_token_losses_and_source_sums_of_both_loss_paths_equal_per_example_losses():
    """Plain and chunked cross-entropy give each position's loss; added up by source they are the
    sums of each source's examples' losses, and they add up to the total."""
    torch.manual_seed(0)
    vocab, width = 50, 16
    examples = random_examples(vocab, [9, 14, 5, 11, 7, 12], sources=3)
    batch = collate([examples[:3], examples[3:]], pad_token_id=0)
    hidden = torch.randn(*batch["targets"].shape, width)
    weight = torch.randn(vocab, width)
    targets, target_sources = batch["targets"], batch["target_sources"]
    expected = torch.zeros(3, dtype=torch.float64)  # each example's loss over its own positions
    for r, row in enumerate([examples[:3], examples[3:]]):
        offset = 0
        for item in row:
            n = len(item["input_ids"])
            logits = hidden[r, offset : offset + n] @ weight.T
            expected[item["source"]] += F.cross_entropy(
                logits, targets[r, offset : offset + n], ignore_index=IGNORE, reduction="sum"
            ).double()
            offset += n
    plain = token_cross_entropy(hidden @ weight.T, targets)
    for chunk_size in (4, 1000):
        total, _, chunked = chunked_cross_entropy(hidden.clone().requires_grad_(True), weight, targets, chunk_size)
        assert not chunked.requires_grad
        assert chunked.double().sum().item() == pytest.approx(total.item(), rel=1e-6)
        assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
        sums = sum_by_source(chunked, target_sources, 3)
        assert sums.double().tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert (plain[targets.reshape(-1) == IGNORE] == 0).all()
    assert sum_by_source(plain, target_sources, 3).double().tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_loss_model_source_sums_equal_examples_alone_chunked_or_not(tiny_model_dir):
    """On a real (tiny) model, packed rows of two sources: each source's sum equals the summed loss
    of its examples, each run alone, for the plain and the chunked path."""
    from sftkit.model.load import load_model

    model = load_model(str(tiny_model_dir), torch.float32, "sdpa")
    examples = random_examples(model.config.vocab_size, [17, 40, 6, 25, 13], sources=2)
    batch = collate([examples[:3], examples[3:]], pad_token_id=0)
    for chunked in (False, True):
        loss_model = CausalLMLoss(model, "sdpa", chunked, chunk_size=7, sources=2)
        with torch.no_grad():
            expected = [0.0, 0.0]
            for item in examples:
                expected[item["source"]] += loss_model(**collate([[item]], pad_token_id=0)).item()
            total = loss_model(**batch).item()
        assert loss_model.source_loss.tolist() == pytest.approx(expected, rel=1e-5)
        assert sum(loss_model.source_loss.tolist()) == pytest.approx(total, rel=1e-6)


def test_window_figures_by_source_name():
    window = empty_window()
    accumulate_sources(window, [3.0, 0.0], [2, 0])
    accumulate_sources(window, [6.0, 0.0], [4, 0])
    figures = source_figures(window, ["gsm8k", "sharegpt"])
    assert figures == {"source_trained_tokens": {"gsm8k": 6, "sharegpt": 0}, "source_loss": {"gsm8k": 1.5}}
    assert flat_scalars({"loss": 1.5, **figures}) == {
        "loss": 1.5,
        "source_trained_tokens/gsm8k": 6,
        "source_trained_tokens/sharegpt": 0,
        "source_loss/gsm8k": 1.5,
    }


def rebuilt_feed(config):
    """The run's feed again, from its config: its order is a pure function of (seed, step)."""
    from sftkit.data.template import resolve_chat_template
    from sftkit.model.load import load_tokenizer
    from sftkit.train.run_data import load_run_data

    tokenizer = load_tokenizer(config.tokenizer_source)
    one_process = SimpleNamespace(
        is_main_process=True, process_index=0, num_processes=1, main_process_first=nullcontext
    )
    return load_run_data(
        config, tokenizer, resolve_chat_template(config.chat_template, tokenizer), one_process, tell=lambda text: None
    ).feed


def alone_loss_sum(model: torch.nn.Module, item: dict) -> float:
    """The summed loss of one example's trained targets, by a plain transformers forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]  # (seq - 1, vocab)
    return F.cross_entropy(logits, torch.tensor(item["labels"][1:]), ignore_index=IGNORE, reduction="sum").item()


@pytest.mark.slow
def test_logged_source_loss_equals_each_sources_examples_recomputed(tmp_path, tiny_model_dir):
    """A mixture of two sources (packed, micro 2 × GA 2, logged every step) with a learning rate too
    small to move the weights: each row's source_loss equals the loss of that step's examples of the
    source, each run alone through the initial model, and source_trained_tokens their trained targets.
    The report of the run plots loss per source and the realised mixture against the target."""
    from transformers import AutoModelForCausalLM

    from sftkit.report import build_report

    long_chats = write_chat_data(tmp_path / "long.jsonl", rows=40, seed=0)
    short_chats = write_chat_data(tmp_path / "short.jsonl", rows=40, seed=1)
    config = tiny_config(
        tiny_model_dir,
        long_chats,
        tmp_path / "out",
        max_steps=4,
        learning_rate=1e-12,
        lora_dropout=0.0,
        save_steps=100,
        packing_buffer=16,
        datasets=[{"path": str(long_chats), "weight": 3}, {"path": str(short_chats), "weight": 1}],
    )
    loop.train(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]

    feed = rebuilt_feed(config)
    assert feed.sources == ["long", "short"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # LoRA starts at B = 0: the base model
    seen, worst = set(), 0.0
    for step, row in enumerate(rows):
        drawn = feed.draw(step)
        loss_sums, trained = [0.0, 0.0], [0, 0]
        for micro_batch, counts in drawn.micro_batches:
            assert counts
            for item in (item for sequence in micro_batch for item in sequence):
                loss_sums[item["source"]] += alone_loss_sum(base, item)
                trained[item["source"]] += item["trained"]
        assert trained == drawn.source_trained.tolist()
        assert row["source_trained_tokens"] == dict(zip(feed.sources, trained, strict=True))
        expected = {
            name: loss_sum / count
            for name, loss_sum, count in zip(feed.sources, loss_sums, trained, strict=True)
            if count
        }
        assert row["source_loss"].keys() == expected.keys()
        worst = max([worst, *(abs(row["source_loss"][name] / expected[name] - 1) for name in expected)])
        assert sum(
            row["source_loss"][name] * row["source_trained_tokens"][name] for name in row["source_loss"]
        ) == pytest.approx(row["loss"] * row["trained_tokens"], rel=1e-5)
        seen.update(row["source_loss"])
    assert seen == {"long", "short"}
    print(f"logged per-source loss vs each example alone: worst relative difference {worst:.1e}")
    assert worst <= 1e-5

    page = build_report(tmp_path / "out").read_text()
    assert 'alt="Loss per source"' in page and 'alt="Mixture of trained tokens"' in page
