"""The demo's task: put a short list of numbers in order, asked for in plain English.

A person sees at a glance whether an answer is right, and exact match scores it:

    user       Sort from smallest to largest: 42, 7, 19, 3
    assistant  3, 7, 19, 42

Everything is generated from a seed, so every run of the demo sees the same data. The held-out
test lists never appear in the pre-training text nor in the fine-tuning data, so the accuracy the
demo reports is on lists the model has never seen.

The pre-training text states the same facts in another shape (`42 7 19 3 -> 3 7 19 42`): the base
model learns to sort there, and fine-tuning teaches it to follow the chat format, the way a real
base model learns skills from raw text and the instruction format from SFT.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MIN_LENGTH, MAX_LENGTH = 3, 6  # numbers per list
MAX_NUMBER = 99

INSTRUCTIONS = (
    "Sort from smallest to largest: {numbers}",
    "Put these numbers in ascending order: {numbers}",
    "Sort these numbers: {numbers}",
    "Arrange in increasing order: {numbers}",
    "Order from lowest to highest: {numbers}",
)


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    phrasing: int = 0  # which of INSTRUCTIONS asks for it

    @property
    def answer(self) -> str:
        return ", ".join(map(str, sorted(self.numbers)))

    def prompt(self) -> str:
        return INSTRUCTIONS[self.phrasing].format(numbers=", ".join(map(str, self.numbers)))

    def messages(self) -> list[dict[str, str]]:
        """A chat example (`messages` format) for fine-tuning."""
        return [{"role": "user", "content": self.prompt()}, {"role": "assistant", "content": self.answer}]

    def text(self) -> str:
        """The same fact as raw pre-training text: no instruction, no chat format, no commas."""
        return " ".join(map(str, self.numbers)) + " -> " + " ".join(map(str, sorted(self.numbers)))


def random_problem(rng: random.Random) -> Problem:
    length = rng.randint(MIN_LENGTH, MAX_LENGTH)
    numbers = tuple(rng.randint(0, MAX_NUMBER) for _ in range(length))
    return Problem(numbers, rng.randrange(len(INSTRUCTIONS)))


@dataclass(frozen=True)
class TaskData:
    pretrain_text: list[str]
    train: list[Problem]
    eval: list[Problem]  # eval loss and the sample prompts during fine-tuning
    test: list[Problem]  # held out: exact-match accuracy before and after fine-tuning


def make_task(seed: int, pretrain_rows: int, train_rows: int, eval_rows: int, test_rows: int) -> TaskData:
    """Deterministic splits; no list of numbers is in more than one of test, eval and the training data."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()

    def fresh(count: int) -> list[Problem]:
        problems: list[Problem] = []
        while len(problems) < count:
            problem = random_problem(rng)
            if problem.numbers not in seen:
                seen.add(problem.numbers)
                problems.append(problem)
        return problems

    test, evaluation = fresh(test_rows), fresh(eval_rows)
    held_out = set(seen)
    train = fresh(train_rows)
    pretrain: list[str] = []
    while len(pretrain) < pretrain_rows:  # repeats are fine in raw text, held-out lists are not
        problem = random_problem(rng)
        if problem.numbers not in held_out:
            pretrain.append(problem.text())
    return TaskData(pretrain_text=pretrain, train=train, eval=evaluation, test=test)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_task(task: TaskData, folder: Path) -> dict[str, Path]:
    """The splits as files `sftkit train` reads: `text` rows for pre-training, `messages` rows for SFT."""
    return {
        "pretrain": write_jsonl([{"text": text} for text in task.pretrain_text], folder / "pretrain.jsonl"),
        "train": write_jsonl([{"messages": p.messages()} for p in task.train], folder / "train.jsonl"),
        "eval": write_jsonl([{"messages": p.messages()} for p in task.eval], folder / "eval.jsonl"),
        "test": write_jsonl([{"messages": p.messages()} for p in task.test], folder / "test.jsonl"),
    }
