"""Batched greedy generation and teacher-forced reference loss, on a model already in memory.

Batches are padded on the left, so every prompt ends at the same column and the first new token of each
row is predicted from its own last prompt token:

    row 0   <pad> <pad> p0 p1 p2 | n0 n1 ...     attention_mask 0 0 1 1 1 | 1 1
    row 1   q0    q1    q2 q3 q4 | m0 m1 ...     attention_mask 1 1 1 1 1 | 1 1
    position ids (from the mask)  1 1 0 1 2 | 3 4  and  0 1 2 3 4 | 5 6

transformers' `generate` builds position ids from the attention mask and the KV cache carries the mask,
so a padded row computes what it would alone (tests/test_evaluate_real.py holds batched to one-at-a-time
token for token on SmolLM2). Prompts are sorted by length before batching, so padding stays small.

Cost: one forward per new token per batch; memory O(batch × (prompt + new tokens)) for the KV cache.
The reference loss is one forward per batch, memory O(batch × length × vocab) for the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from sftkit.data.template import IGNORE_INDEX, end_of_turn, render_prompt, tokenize_conversation
from sftkit.evaluate.examples import EvalExample
from sftkit.model.attention import generation_attention
from sftkit.monitor.samples import _decode, _stop_token_ids
from sftkit.rng import capture_rng, restore_rng

T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    text: str  # the reply, end-of-turn removed
    ended: bool  # the model emitted the end-of-turn (or EOS) before max_new_tokens
    token_ids: tuple[int, ...]  # the new tokens as generated, end-of-turn included


@dataclass(frozen=True)
class ReferenceLoss:
    loss_sum: float  # summed cross-entropy over the reference's tokens
    tokens: int  # reference tokens scored (the reply and its end-of-turn)
    truncated: bool  # the prompt was cut on the left to fit max_length


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items`, `size` long (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _inference_mode(model: Any) -> Iterator[None]:
    """eval mode, sdpa attention and untouched RNG state for the duration, restored afterwards (a training
    loop may call in mid-run)."""
    was_training, states = model.training, capture_rng()
    model.eval()
    try:
        with generation_attention(model):
            yield
    finally:
        model.train(was_training)
        restore_rng(*states)


@dataclass(frozen=True)
class Stops:
    """Where a reply ends: EOS or a one-token end-of-turn by id; an end-of-turn of several tokens (` </s>`
    split in two, `<|im_end|>` not special) by its text."""

    text: str  # the template's end-of-turn, stripped ('' when it has none)
    token_ids: list[int]
    by_text: bool


def stops(template: str, tokenizer: Any) -> Stops:
    text = end_of_turn(template, tokenizer).strip()
    return Stops(text, _stop_token_ids(text, tokenizer), bool(text) and not _is_token(text, tokenizer))


def encode_prompts(examples: Sequence[EvalExample], template: str, tokenizer: Any) -> list[list[int]]:
    """Each example's prompt as the template renders it for a reply (the generation prompt included)."""
    return [
        tokenizer(render_prompt(example.prompt, template, tokenizer, example.tools), add_special_tokens=False)[
            "input_ids"
        ]
        for example in examples
    ]


def to_generation(new_ids: list[int], stop: Stops, pad_id: int | None, tokenizer: Any) -> Generation:
    """A reply from the tokens generated after its prompt: cut after the first stop token, decoded, and cut
    at the end-of-turn's text."""
    kept = _until_stop(new_ids, stop.token_ids, pad_id)
    decoded = _decode(list(kept), stop.text, stop.token_ids, tokenizer, prompt="")
    return Generation(decoded["completion"], decoded["ended"], tuple(kept))


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    template: str,
    examples: Sequence[EvalExample],
    max_new_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy replies to each example's prompt, in example order; `batch_size` 1 generates one at a time.
    `advance(n)` is told of each batch of n examples done (a progress bar)."""
    stop = stops(template, tokenizer)
    stop_text = {"stop_strings": [stop.text], "tokenizer": tokenizer} if stop.by_text else {}
    pad_id = tokenizer.pad_token_id
    prompts = encode_prompts(examples, template, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    results: dict[int, Generation] = {}
    with _inference_mode(model):
        for batch in batches(order, batch_size):
            width = max(len(prompts[index]) for index in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=device
            )  # (batch, width), 0 on the left padding
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop.token_ids,
                pad_token_id=pad_id,
                use_cache=True,
                **stop_text,
            )  # (batch, width + generated)
            for row, index in enumerate(batch):
                results[index] = to_generation(output[row, width:].tolist(), stop, pad_id, tokenizer)
            if advance:
                advance(len(batch))
    return [results[index] for index in range(len(prompts))]


def _is_token(text: str, tokenizer: Any) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _until_stop(new_ids: list[int], stop_ids: list[int], pad_id: int | None) -> list[int]:
    """The row's tokens up to and including its first stop token; a row that finished early on a stop
    string is padded after it by `generate`, and the padding goes."""
    for position, token in enumerate(new_ids):
        if token in stop_ids:
            return new_ids[: position + 1]
    while new_ids and new_ids[-1] == pad_id:
        new_ids = new_ids[:-1]
    return new_ids


@torch.no_grad()
def reference_losses(
    model: Any,
    tokenizer: Any,
    template: str,
    examples: Sequence[EvalExample],
    batch_size: int,
    max_length: int,
    advance: Callable[[int], None] | None = None,
) -> list[ReferenceLoss]:
    """Summed loss over each example's reference tokens (the last assistant turn and its end-of-turn),
    given the whole conversation before it; a conversation longer than `max_length` loses tokens on
    the left, so the reference stays whole while it fits."""
    encoded = [reference_tokens(example, template, tokenizer, max_length) for example in examples]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(encoded)), key=lambda index: -len(encoded[index][0]))
    results: dict[int, ReferenceLoss] = {}
    with _inference_mode(model):
        for batch in batches(order, batch_size):
            width = max(len(encoded[index][0]) for index in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                tokens, targets, _ = encoded[index]
                ids[row, : len(tokens)], labels[row, : len(tokens)], mask[row, : len(tokens)] = (
                    torch.tensor(tokens),
                    torch.tensor(targets),
                    1,
                )
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device)
            ).logits.float()  # (batch, width, vocab)
            shifted = labels[:, 1:].to(device)  # (batch, width - 1): token t+1 is predicted at t
            losses = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
            )  # (batch, width - 1)
            for row, index in enumerate(batch):
                counted = int((shifted[row] != IGNORE_INDEX).sum())
                results[index] = ReferenceLoss(float(losses[row].sum()), counted, encoded[index][2])
            if advance:
                advance(len(batch))
    return [results[index] for index in range(len(encoded))]


def reference_tokens(
    example: EvalExample, template: str, tokenizer: Any, max_length: int
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels on the reference only, truncated) for one example."""
    tokenized = tokenize_conversation(example.messages, template, tokenizer, tools=example.tools)
    input_ids, labels = tokenized["input_ids"], tokenized["labels"]
    # Keep only the last trained run: the reference. Earlier assistant turns are context here.
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    reference_labels = [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]
    truncated = len(input_ids) > max_length
    if truncated:
        cut = min(len(input_ids) - max_length, max(start - 1, 0))  # keep one token of context before the reply
        input_ids, reference_labels = input_ids[cut : cut + max_length], reference_labels[cut : cut + max_length]
    return input_ids, reference_labels, truncated


@dataclass(frozen=True)
class TransformersEngine:
    """A model in memory as `score_with` uses it: padded batches of `batch_size` through transformers."""

    model: Any
    tokenizer: Any
    template: str
    batch_size: int

    def generate(
        self, examples: Sequence[EvalExample], max_new_tokens: int, advance: Callable[[int], None] | None = None
    ) -> list[Generation]:
        return generate_batched(
            self.model, self.tokenizer, self.template, examples, max_new_tokens, self.batch_size, advance
        )

    def reference_losses(
        self, examples: Sequence[EvalExample], max_length: int, advance: Callable[[int], None] | None = None
    ) -> list[ReferenceLoss]:
        return reference_losses(
            self.model, self.tokenizer, self.template, examples, self.batch_size, max_length, advance
        )
