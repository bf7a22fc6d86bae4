"""Exact-match accuracy on the held-out questions: greedy replies, with the template the model trains with.

Prompts are decoded in batches, padded on the left so every prompt ends where generation starts:

    row 0   <pad> <pad> <s> <|im_start|> user ... <|im_start|> assistant \n  → 3 , 7 , ...
    row 1   <s>   <|im_start|> user ...         ... <|im_start|> assistant \n  → 1 , 2 , ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sftkit.data.template import end_of_turn, render_prompt
from sftkit.demo.task import Problem


@dataclass(frozen=True)
class Reply:
    prompt: str
    expected: str
    got: str

    @property
    def correct(self) -> bool:
        return self.got == self.expected

    @property
    def well_formed(self) -> bool:
        """The answer's form: a number and the asked-for unit, then the end of the turn (`9800 centimeters`)."""
        number, _, unit = self.got.partition(" ")
        return number.isdigit() and unit == self.expected.partition(" ")[2]


@dataclass(frozen=True)
class Score:
    replies: list[Reply]

    @property
    def accuracy(self) -> float:
        """Exact match."""
        return sum(r.correct for r in self.replies) / len(self.replies)

    @property
    def well_formed(self) -> float:
        return sum(r.well_formed for r in self.replies) / len(self.replies)


@torch.no_grad()
def score(
    model: Any, tokenizer: Any, template: str, problems: list[Problem], batch_size: int = 100, max_new_tokens: int = 32
) -> Score:
    """Greedy-decode a reply to every problem and compare it, stripped, with the expected answer."""
    stop = end_of_turn(template, tokenizer).strip()
    stop_ids = [tokenizer.eos_token_id, *tokenizer(stop, add_special_tokens=False)["input_ids"][:1]]
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[Reply] = []
    try:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            prompts = [render_prompt(p.messages()[:1], template, tokenizer) for p in batch]
            # The template writes BOS itself, as in training.
            inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            for problem, ids in zip(batch, output[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
                ended = next((i for i, token in enumerate(ids) if token in stop_ids), len(ids))
                # A reply that never ends the turn is wrong however it starts.
                got = (
                    tokenizer.decode(ids[:ended], skip_special_tokens=True).strip()
                    if ended < len(ids)
                    else (tokenizer.decode(ids, skip_special_tokens=True).strip() + " …")
                )
                replies.append(Reply(problem.prompt(), problem.answer, got))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return Score(replies)
