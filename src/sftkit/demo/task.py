"""The demo's task: unit conversions, asked for in plain English.

A person sees at a glance whether an answer is right, and exact match scores it:

    user       How many grams are in 35 kilograms?
    assistant  35000 grams

Everything is generated from a seed, so every run of the demo sees the same data. The held-out
test questions (a number and a pair of units) never appear in the pre-training text nor in the
fine-tuning data, so the accuracy the demo reports is on conversions the model has never seen.

The pre-training text states the same facts without questions or chat turns
(`35 kilograms = 35000 grams`, `In 35 kilograms there are 35000 grams.`): the base model learns the
conversions there, and fine-tuning teaches it to answer questions in the chat format, as a real base
model learns from raw text and learns to follow instructions from SFT.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Two-digit numbers that do not end in 0: the tokenizer writes each as one token, so the answer is
# that token followed by a token of zeros (`35000` = `35` `000`).
NUMBERS = tuple(n for n in range(1, 100) if n % 10)
CONVERSIONS = (  # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("dollars", "cents", 100),
    ("decades", "years", 10),
    ("centuries", "years", 100),
)
QUESTIONS = (
    "How many {to} are in {number} {unit}?",
    "Convert {number} {unit} to {to}.",
    "What is {number} {unit} in {to}?",
    "{number} {unit} is how many {to}?",
)
# Raw-text shapes of a fact. The number sits at different distances from the answer, so the base
# model learns to find it wherever it is (as it must in a question), not at a fixed offset.
STATEMENTS = (
    "{number} {unit} = {answer}",
    "{number} {unit} is {answer}.",
    "In {number} {unit} there are {answer}.",
    "If you have {number} {unit}, you have {answer}.",
    "{number} {unit}, written in {to}, is {answer}.",
    "We converted {number} {unit} to {to} and got {answer}.",
)
FACTS_PER_TEXT_ROW = 8


@dataclass(frozen=True)
class Problem:
    number: int
    conversion: int  # index into CONVERSIONS
    phrasing: int = 0  # index into QUESTIONS

    @property
    def key(self) -> tuple[int, int]:
        return self.number, self.conversion

    @property
    def answer(self) -> str:
        _, to, factor = CONVERSIONS[self.conversion]
        return f"{self.number * factor} {to}"

    def prompt(self) -> str:
        unit, to, _ = CONVERSIONS[self.conversion]
        return QUESTIONS[self.phrasing].format(number=self.number, unit=unit, to=to)

    def messages(self) -> list[dict[str, str]]:
        """A chat example (`messages` format) for fine-tuning."""
        return [{"role": "user", "content": self.prompt()}, {"role": "assistant", "content": self.answer}]

    def fact(self, shape: int = 0) -> str:
        """The same fact as raw pre-training text (one of STATEMENTS): no question, no chat format."""
        unit, to, _ = CONVERSIONS[self.conversion]
        return STATEMENTS[shape].format(number=self.number, unit=unit, to=to, answer=self.answer)


def random_problem(rng: random.Random) -> Problem:
    return Problem(rng.choice(NUMBERS), rng.randrange(len(CONVERSIONS)), rng.randrange(len(QUESTIONS)))


@dataclass(frozen=True)
class TaskData:
    pretrain_text: list[str]  # rows of FACTS_PER_TEXT_ROW facts, one per line
    train: list[Problem]
    eval: list[Problem]  # eval loss and the sample prompts during fine-tuning
    test: list[Problem]  # held out: exact-match accuracy before and after fine-tuning


def make_task(seed: int, pretrain_rows: int, train_rows: int, eval_rows: int, test_rows: int) -> TaskData:
    """Deterministic splits: no (number, units) pair of test or eval is in the training data or the text."""
    pairs = len(NUMBERS) * len(CONVERSIONS)
    if test_rows + eval_rows > pairs // 2:
        raise ValueError(
            f"test_rows + eval_rows = {test_rows + eval_rows} would hold out more than half of the "
            f"{pairs} (number, units) pairs; keep it under {pairs // 2}"
        )
    rng = random.Random(seed)
    held_out: set[tuple[int, int]] = set()

    def fresh(count: int) -> list[Problem]:
        problems: list[Problem] = []
        while len(problems) < count:
            problem = random_problem(rng)
            if problem.key not in held_out:
                held_out.add(problem.key)
                problems.append(problem)
        return problems

    test, evaluation = fresh(test_rows), fresh(eval_rows)

    def seen(count: int) -> list[Problem]:  # repeats are fine here, held-out pairs are not
        problems: list[Problem] = []
        while len(problems) < count:
            problem = random_problem(rng)
            if problem.key not in held_out:
                problems.append(problem)
        return problems

    train = seen(train_rows)
    facts = [p.fact(rng.randrange(len(STATEMENTS))) for p in seen(pretrain_rows * FACTS_PER_TEXT_ROW)]
    text = ["\n".join(facts[i : i + FACTS_PER_TEXT_ROW]) for i in range(0, len(facts), FACTS_PER_TEXT_ROW)]
    return TaskData(pretrain_text=text, train=train, eval=evaluation, test=test)


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
