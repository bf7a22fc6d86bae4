"""Metrics beyond loss: token accuracy on trained tokens, and the share of steps clipped by max_grad_norm."""

from __future__ import annotations

import json
import random
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import sftkit.train.loop as loop
from sftkit.data.collate import collate
from sftkit.train.forward import CausalLMLoss
from sftkit.train.loss import chunked_cross_entropy, correct_predictions
from tests.train_helpers import WORDS, tiny_config

IGNORE = -100


def write_short_chats(path: Path, rows: int, seed: int = 3) -> Path:
    """Single-turn chats of a few words each (about 75 tokens with the tiny tokenizer)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))},
                            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))},
                        ]
                    }
                )
                + "\n"
            )
    return path


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def reference_hits(model: torch.nn.Module, examples) -> tuple[int, int]:
    """(argmax hits, trained targets) of each example run alone through a plain transformers forward."""
    hits = trained = 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]  # (seq - 1, vocab)
            labels = torch.tensor(example["labels"][1:])
            mask = labels != IGNORE
            hits += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            trained += int(mask.sum())
    return hits, trained


def test_chunked_and_plain_counts_equal_the_argmax_reference():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 29, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (3, 29))
    targets[:, :7] = IGNORE
    logits = hidden @ weight.T
    targets[0, 10] = logits[0, 10].argmax()  # at least one hit
    reference = int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())
    assert reference > 0
    assert int(correct_predictions(logits, targets)) == reference
    for chunk_size in (4, 16, 1000):
        with torch.no_grad():
            _, correct, _ = chunked_cross_entropy(hidden, weight, targets, chunk_size)
        assert int(correct) == reference
        _, correct, _ = chunked_cross_entropy(hidden.clone().requires_grad_(True), weight, targets, chunk_size)
        assert int(correct) == reference and not correct.requires_grad


def test_loss_model_counts_hits_the_same_chunked_or_not(tiny_model_dir):
    from sftkit.model.load import load_model, load_tokenizer

    model = load_model(str(tiny_model_dir), torch.float32, "sdpa")
    generator = torch.Generator().manual_seed(1)
    examples = []
    for n in (17, 40, 6, 25):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3 :]})
    batch = collate([examples[:2], examples[2:]], load_tokenizer(str(tiny_model_dir)).pad_token_id)  # packed rows
    counts = []
    for chunked in (False, True):
        loss_model = CausalLMLoss(model, "sdpa", chunked, chunk_size=7)
        with torch.no_grad():
            loss_model(**batch)
        counts.append(int(loss_model.correct))
    assert counts[0] == counts[1] == reference_hits(model, examples)[0]


@pytest.mark.slow
def test_token_accuracy_equals_reference_on_packed_accumulated_steps(tmp_path, tiny_model_dir):
    """Step 1 (packed, micro 2 × GA 2, the whole epoch) is scored on the base weights (LoRA B = 0):
    its logged token accuracy is the base model's argmax hits over all trained tokens, each example
    alone. Eval (packed too) after that step matches base + the saved adapter the same way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.data.dataset import DataOptions, prepare_data
    from sftkit.data.template import resolve_chat_template
    from sftkit.model.load import load_tokenizer

    data = write_short_chats(tmp_path / "chat.jsonl", rows=16)
    config = tiny_config(
        tiny_model_dir,
        data,
        tmp_path / "out",
        max_steps=1,
        eval_split_ratio=0.25,
        eval_steps=1,
        max_seq_length=256,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-2,
        max_new_tokens=1,
    )
    result = loop.train(config)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert result.status == "finished" and run["steps_per_epoch"] == 1 and 3 <= run["sequences"] <= 4
    assert run["chunked_loss"] and run["packing"]

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepared = prepare_data(DataOptions.from_config(config, resolve_chat_template("chatml", tokenizer)), tokenizer)
    assert len(prepared.train.dataset) > run["sequences"]  # packs hold several examples
    train_row, eval_row = metric_rows(tmp_path / "out")

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    hits, trained = reference_hits(base, prepared.train.dataset)
    assert train_row["trained_tokens"] == trained and hits > 0
    assert train_row["token_accuracy"] == hits / trained

    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out" / "adapter"
    )
    hits, trained = reference_hits(tuned, prepared.eval.dataset)
    assert eval_row["eval_tokens"] == trained
    assert eval_row["eval_token_accuracy"] == hits / trained
    assert eval_row["eval_token_accuracy"] != train_row["token_accuracy"]  # the weights did change in between


@pytest.mark.slow
def test_clipped_share_counts_exactly_the_steps_whose_norm_exceeds_max_grad_norm(tmp_path, tiny_model_dir):
    """With a learning rate too small to move the weights, every run sees the same gradient norms; a
    run without clipping tells which steps a threshold clips, and the clipped run must count those."""
    data = write_short_chats(tmp_path / "chat.jsonl", rows=24)
    common = dict(
        max_steps=6,
        learning_rate=1e-9,
        lora_dropout=0.0,
        save_steps=100,
        max_seq_length=96,
        gradient_accumulation_steps=1,
    )
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "free", max_grad_norm=0, **common))
    free = metric_rows(tmp_path / "free")
    norms = [row["grad_norm"] for row in free]
    assert all(row["clipped_steps"] == 0 for row in free)
    ordered = sorted(norms)
    low, high = max(pairwise(ordered[1:-1]), key=lambda pair: pair[1] - pair[0])
    threshold = (low + high) / 2  # a wide gap in the middle: some steps clip, some do not
    clipped = [norm > threshold for norm in norms]
    assert 0 < sum(clipped) < len(clipped)

    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "clip", max_grad_norm=threshold, logging_steps=3, **common))
    rows = metric_rows(tmp_path / "clip")
    assert [row["step"] for row in rows] == [3, 6]
    assert [row["grad_norm"] for row in rows] == pytest.approx([norms[2], norms[5]], rel=1e-5)
    assert [row["clipped_steps"] for row in rows] == [sum(clipped[:3]), sum(clipped[3:])]
    assert [row["clipped_fraction"] for row in rows] == [sum(clipped[:3]) / 3, sum(clipped[3:]) / 3]
