"""The demo: the task data is deterministic and leak-free, the tokenizer is a real chat tokenizer, and
`sftkit demo --quick` fine-tunes the base model from near zero to well above it through `sftkit train`."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from sftkit.demo.task import CONVERSIONS, FACTS_PER_TEXT_ROW, NUMBERS, STATEMENTS, Problem, make_task


def test_task_is_deterministic_and_test_pairs_are_held_out():
    task = make_task(seed=3, pretrain_rows=200, train_rows=300, eval_rows=20, test_rows=50)
    assert task == make_task(seed=3, pretrain_rows=200, train_rows=300, eval_rows=20, test_rows=50)
    held_out = {p.key for p in task.test} | {p.key for p in task.eval}
    assert len(held_out) == 70  # no pair in both test and eval
    assert not held_out & {p.key for p in task.train}
    facts = [line for row in task.pretrain_text for line in row.splitlines()]
    assert len(facts) == 200 * FACTS_PER_TEXT_ROW
    assert not set(facts) & {p.fact(shape) for p in task.test for shape in range(len(STATEMENTS))}


def test_problem_renders_question_answer_and_fact():
    problem = Problem(number=35, conversion=[c[0] for c in CONVERSIONS].index("kilograms"), phrasing=0)
    assert problem.messages() == [
        {"role": "user", "content": "How many grams are in 35 kilograms?"},
        {"role": "assistant", "content": "35000 grams"},
    ]
    assert problem.fact() == "35 kilograms = 35000 grams"


def test_tokenizer_is_a_chat_tokenizer_with_one_token_end_of_turn(tmp_path):
    from sftkit.data.template import end_of_turn, resolve_chat_template, tokenize_conversation
    from sftkit.demo.base import build_tokenizer
    from sftkit.model.load import load_tokenizer

    task = make_task(seed=0, pretrain_rows=200, train_rows=200, eval_rows=5, test_rows=5)
    build_tokenizer(task.pretrain_text + [p.prompt() for p in task.train], tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
    )
    template = resolve_chat_template(None, tokenizer)
    stop = end_of_turn(template, tokenizer)
    assert stop == "<|im_end|>" and len(tokenizer(stop, add_special_tokens=False)["input_ids"]) == 1
    encoded = tokenize_conversation(Problem(35, 3).messages(), template, tokenizer)
    trained = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == "35000 grams<|im_end|>"
    assert tokenizer.tokenize("35000 grams") == ["35", "000", "Ġgrams"]
    assert all(len(tokenizer.tokenize(str(n))) == 1 for n in NUMBERS)  # answers copy one token


@pytest.mark.slow
def test_quick_demo_fine_tunes_well_above_the_base_model(tmp_path):
    """--quick pre-trains too briefly for the base model to copy numbers (the full demo reaches ~98% exact
    match), so this asserts what fine-tuning teaches in any case: the answer's form, from about never to
    almost always, through the real `sftkit train` run and its outputs."""
    from sftkit.demo.run import run_demo

    result = run_demo(quick=True, output_dir=tmp_path, console=Console(record=True, width=100))
    assert result.accuracy_before <= 0.05 and result.well_formed_before <= 0.05
    assert result.well_formed_after >= result.well_formed_before + 0.8
    assert result.accuracy_after >= result.accuracy_before
    sft = tmp_path / "sft"
    assert (sft / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "pretrain" / "model" / "model.safetensors").is_file()
    assert json.loads((sft / "run.json").read_text())["status"] == "finished"
    samples = [json.loads(line) for line in (sft / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[-1]["ended"]
    metrics = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in metrics)
