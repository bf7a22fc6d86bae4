"""Small builders for end-to-end training tests: a chat dataset file and a config for the tiny model."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sftkit.config import SFTConfig, validate_config

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "what",
    "is",
    "plus",
    "answer",
    "hello",
    "how",
    "can",
    "help",
    "you",
    "today",
]


def write_chat_data(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Conversations of very uneven length, some multi-turn, as `messages` JSONL."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            messages = []
            for _ in range(rng.choice([1, 1, 2, 3])):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 25)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))})
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def tiny_config(model_dir: Path, data: Path, output_dir: Path, **overrides: Any) -> SFTConfig:
    values: dict[str, Any] = dict(
        model_name_or_path=str(model_dir),
        chat_template="chatml",
        max_seq_length=256,
        datasets=[{"path": str(data)}],
        finetuning="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=5e-3,
        warmup_steps=2,
        logging_steps=1,
        save_steps=3,
        output_dir=str(output_dir),
        report_to="none",
        seed=7,
        sample_holdout=0,  # no eval data: train on every row, take no samples (tests that want them set it)
    )
    values.update(overrides)
    return validate_config(values)


def final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    folder = output_dir / "adapter"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else None
    if name is None:
        folder, name = output_dir / "model", "model.safetensors"
    return load_file(str(folder / name))


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(expected_dir: Path, got_dir: Path, steps: int, what: str) -> None:
    """The run in `got_dir` ended with the weights (≤ 1e-6) and logged every loss (≤ 1e-6 relative) of
    the run in `expected_dir`."""
    import pytest

    difference = max_weight_difference(final_weights(expected_dir), final_weights(got_dir))
    print(f"{what}: max weight difference {difference:.2e}")
    assert difference <= 1e-6, difference
    expected, got = logged_losses(expected_dir), logged_losses(got_dir)
    assert sorted(got) == list(range(1, steps + 1))  # rows past a checkpoint were rewritten, not duplicated
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


@contextmanager
def crash_in_step(monkeypatch: Any, step: int) -> Iterator[None]:
    """Inside the block, the loop's `step`-th gradient accumulation raises `RuntimeError("simulated crash")`."""
    import sftkit.train.step as step_module

    real = step_module.accumulate_gradients
    calls = {"n": 0}

    def crash(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "accumulate_gradients", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(step_module, "accumulate_gradients", real)


def worst_packed_vs_alone(loss_model: Any, rows: list[list[dict]], pad_token_id: int = 0) -> float:
    """Max relative difference between each example's loss inside the packed rows and its loss alone."""
    import torch

    from sftkit.data.collate import collate

    device = next(loss_model.parameters()).device

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    packed = on_device(collate(rows, pad_token_id))
    worst = 0.0
    with torch.no_grad():
        for r, row in enumerate(rows):
            for s, example in enumerate(row, start=1):
                alone = loss_model(**on_device(collate([[example]], pad_token_id))).item()
                keep = torch.zeros_like(packed["segment_ids"], dtype=torch.bool)
                keep[r] = packed["segment_ids"][r] == s  # this example's targets only
                inside = loss_model(**dict(packed, targets=packed["targets"].masked_fill(~keep, -100))).item()
                worst = max(worst, abs(inside - alone) / max(1.0, abs(alone)))
    return worst
