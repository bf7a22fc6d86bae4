"""A base model without a chat template: prompt/completion and alpaca rows are plain text, the prompt,
then the completion, then EOS, with the loss on the completion and EOS (as TRL does). Generation renders
prompts the same way; conversation data still needs a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.data.template import (
    IGNORE_INDEX,
    assistant_spans,
    end_of_turn,
    is_plain,
    render_prompt,
    resolve_chat_template,
    tokenize_conversation,
)

PROMPT, COMPLETION = "Question: What is 12 plus 30?\nAnswer:", " The answer is 42."


@pytest.fixture(params=["llama2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue("llama2_tokenizer" if request.param == "llama2" else "tiny_tokenizer")


def pair(prompt: str = PROMPT, completion: str = COMPLETION) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def test_without_a_template_the_completion_and_eos_are_trained(tokenizer):
    assert not tokenizer.chat_template
    template = resolve_chat_template(None, tokenizer)
    assert is_plain(template)
    encoded = tokenize_conversation(pair(), template, tokenizer)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == ids[first:]  # one run, to the end
    assert tokenizer.decode(trained).strip() == f"{COMPLETION.strip()}{tokenizer.eos_token}"
    assert tokenizer.decode(ids[:first]) == f"{tokenizer.bos_token}{PROMPT}"


def test_generation_prompt_is_the_training_text_before_the_completion(tokenizer):
    template = resolve_chat_template(None, tokenizer)
    full, spans = assistant_spans(pair(), template, tokenizer)
    prompt = render_prompt(pair()[:1], template, tokenizer)
    assert full == f"{tokenizer.bos_token}{PROMPT}{COMPLETION}{tokenizer.eos_token}"
    assert prompt == full[: spans[0][0]] == f"{tokenizer.bos_token}{PROMPT}"
    assert end_of_turn(template, tokenizer) == tokenizer.eos_token  # what generation stops at


def write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "rows, rendering",
    [
        ([{"prompt": PROMPT, "completion": COMPLETION}], "plain text: prompt, then completion, then EOS"),
        ([{"instruction": "Add 12 and 30.", "output": "42"}], "plain text: prompt, then completion, then EOS"),
    ],
)
def test_data_inspect_says_which_rendering_it_used(tmp_path, tiny_tokenizer_dir, rows, rendering):
    data = write(tmp_path, "data.jsonl", rows)
    config = tmp_path / "config.yaml"
    for chat_template, expected in ((None, rendering), ("chatml", "built-in chat template 'chatml'")):
        keys = {"model_name_or_path": str(tiny_tokenizer_dir), "max_seq_length": 128, "datasets": [{"path": str(data)}]}
        if chat_template:
            keys["chat_template"] = chat_template
        config.write_text(yaml.safe_dump(keys), encoding="utf-8")
        result = CliRunner().invoke(app, ["data", "inspect", str(config), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["rendering"].startswith(expected)


def test_conversation_data_without_a_template_stops_with_the_clear_error(tmp_path, tiny_tokenizer_dir):
    data = write(tmp_path, "chat.jsonl", [{"messages": pair()}])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model_name_or_path": str(tiny_tokenizer_dir), "max_seq_length": 128, "datasets": [{"path": str(data)}]}
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["data", "inspect", str(config)])
    assert result.exit_code == 2
    assert "messages data needs a chat template" in result.output and "has no chat template" in result.output


def test_generation_sees_the_training_tokens_before_the_completion_and_stops_at_eos(tiny_model_dir):
    """`sftkit generate` and samples feed the model exactly the tokens training put before the completion,
    and stop at EOS, the end of a plain-text example."""
    import torch

    from sftkit.model.load import load_model, load_tokenizer
    from sftkit.monitor.samples import generate_samples
    from tests.test_samples import always_emit

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), torch.float32)
    always_emit(model, tokenizer.eos_token_id)
    template = resolve_chat_template(None, tokenizer)
    seen: list[list[int]] = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: (
        seen.append(input_ids[0].tolist()) or generate(input_ids=input_ids, **kwargs)
    )
    sample = generate_samples(model, tokenizer, template, [pair()[:1]], max_new_tokens=4)[0]
    encoded = tokenize_conversation(pair(), template, tokenizer)
    first_trained = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    assert seen == [encoded["input_ids"][:first_trained]]
    assert sample == {"prompt": PROMPT, "completion": "", "ended": True}
