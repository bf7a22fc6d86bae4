"""Tool calls and reasoning in `messages` data: assistant tool calls and reasoning are trained as part of
the assistant turn, tool results never; `train_on_reasoning: false` trains only the final answer.
Templates: Qwen2.5 and Llama-3.1 style for tools, a think-block and a harmony one for reasoning
(tests/fixtures/templates/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkit.config import DatasetSpec
from sftkit.data.formats import load_source
from sftkit.data.template import IGNORE_INDEX, assistant_spans, resolve_chat_template
from sftkit.data.tokenize import TokenizeOptions, tokenize_dataset, tokenize_row
from tests.test_template_kinds import assert_generated_text
from tests.test_template_masking import TEMPLATES

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": '{"temperature": 18, "sky": "cloudy"}'},
    {"role": "assistant", "content": "It is 18 degrees and cloudy in Paris."},
    {"role": "user", "content": "And in Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Rome"})]},
    {"role": "tool", "content": '{"temperature": 24, "sky": "sunny"}'},
    {"role": "assistant", "content": "Rome: 24 degrees and sunny."},
]
TRAINED_TOOL_TURNS = {
    "qwen25": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 degrees and cloudy in Paris.<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Rome: 24 degrees and sunny.<|im_end|>",
    ],
    "llama31": [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 degrees and cloudy in Paris.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>',
        "Rome: 24 degrees and sunny.<|eot_id|>",
    ],
}


@pytest.fixture(params=["llama2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue("llama2_tokenizer" if request.param == "llama2" else "tiny_tokenizer")


def template_named(name: str, tokenizer) -> str:
    return resolve_chat_template(str(TEMPLATES / f"{name}.jinja"), tokenizer)


@pytest.mark.parametrize("name", TRAINED_TOOL_TURNS)
def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer, name):
    template = template_named(name, tokenizer)
    full, spans = assistant_spans(WEATHER, template, tokenizer, tools=TOOLS)
    assert "get_weather" in full[: spans[0][0]]  # the tool list is rendered, in the prompt
    assert [full[start:end] for start, end in spans] == TRAINED_TOOL_TURNS[name]
    row = tokenize_row(
        {"messages": WEATHER, "tools": json.dumps(TOOLS), "text": ""},
        tokenizer,
        TokenizeOptions(template, max_seq_length=4096),
    )
    assert_generated_text(tokenizer, row, TRAINED_TOOL_TURNS[name])
    results = [m["content"] for m in WEATHER if m["role"] == "tool"]
    trained_text = tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])
    assert not any(result in trained_text for result in results)


REASONED = [
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "42.", "reasoning_content": "12 plus 30 is 42."},
    {"role": "user", "content": "And 2 plus 2?"},
    {"role": "assistant", "content": "4.", "thinking": "Two and two make four."},
]
# (trained with reasoning, trained without): past reasoning is not rendered by either template; without
# reasoning, the reasoning text is masked and everything else the model generates stays trained.
TRAINED_REASONING = {
    "think": (
        ["</think>42.<|im_end|>", "Two and two make four.\n</think>\n4.<|im_end|>"],
        ["</think>42.<|im_end|>", "\n</think>\n4.<|im_end|>"],
    ),
    "harmony": (
        [
            "<|channel|>final<|message|>42.<|end|>",
            "<|channel|>analysis<|message|>Two and two make four.<|end|><|start|>assistant<|channel|>final"
            "<|message|>4.<|return|>",
        ],
        [
            "<|channel|>final<|message|>42.<|end|>",
            "<|channel|>analysis<|message|>",
            "<|end|><|start|>assistant<|channel|>final<|message|>4.<|return|>",
        ],
    ),
}


@pytest.mark.parametrize("train_on_reasoning", [True, False])
@pytest.mark.parametrize("name", TRAINED_REASONING)
def test_reasoning_is_trained_with_the_turn_unless_only_the_answer_is(tokenizer, name, train_on_reasoning):
    template = template_named(name, tokenizer)
    expected = TRAINED_REASONING[name][0 if train_on_reasoning else 1]
    full, spans = assistant_spans(REASONED, template, tokenizer, train_on_reasoning=train_on_reasoning)
    assert [full[start:end] for start, end in spans] == expected
    row = tokenize_row(
        {"messages": REASONED, "text": ""},
        tokenizer,
        TokenizeOptions(template, max_seq_length=4096, train_on_reasoning=train_on_reasoning),
    )
    assert_generated_text(tokenizer, row, expected)


def test_tool_rows_load_from_a_file_and_keep_their_own_arguments(tmp_path, tiny_tokenizer):
    """A JSONL file whose rows call different tools: the Arrow schema is shared by all rows, so the keys of
    one row's arguments must not reach another row's rendering as nulls."""
    convert = [
        {
            "type": "function",
            "function": {
                "name": "convert",
                "parameters": {
                    "type": "object",
                    "properties": {"amount": {"type": "number"}, "unit": {"type": "string"}},
                },
            },
        }
    ]
    rows = [
        {"messages": WEATHER[:4], "tools": TOOLS},
        {
            "messages": [
                {"role": "user", "content": "3 km in miles?"},
                {"role": "assistant", "content": None, "tool_calls": [call("convert", {"amount": 3, "unit": "km"})]},
                {"role": "tool", "content": "1.86"},
                {"role": "assistant", "content": "About 1.86 miles.", "reasoning_content": "3 * 0.621"},
            ],
            "tools": convert,
        },
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    source = load_source(DatasetSpec(path=str(path)), None, skip_bad_rows=False)
    assert source.format == "messages"
    stored = source.dataset[1]
    assert json.loads(stored["tools"]) == convert
    assert json.loads(stored["messages"][1]["tool_calls"]) == [call("convert", {"amount": 3, "unit": "km"})]
    assert stored["messages"][3]["reasoning_content"] == "3 * 0.621"
    template = template_named("qwen25", tiny_tokenizer)
    tokenized = tokenize_dataset(source.dataset, tiny_tokenizer, TokenizeOptions(template, max_seq_length=4096))
    texts = [tiny_tokenizer.decode(ids) for ids in tokenized.dataset["input_ids"]]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in texts[0]
    assert '{"name": "convert", "arguments": {"amount": 3, "unit": "km"}}' in texts[1]
    assert "null" not in texts[0] + texts[1]


@pytest.mark.parametrize(
    "turns, error",
    [
        (
            [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}],
            "roles out of order: turn 2 is tool, expected assistant",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [call("f", {})]},
                {"role": "user", "content": "Hi"},
            ],
            "roles out of order: turn 3 is user, expected tool",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]},
            ],
            "tool call 1 of turn 2 has no function name",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{oops"}]},
            ],
            "tool call 1 of turn 2: arguments are not valid JSON",
        ),
    ],
)
def test_bad_tool_rows_name_the_row_and_the_turn(tmp_path: Path, turns, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]})
        + "\n"
        + json.dumps({"messages": turns})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 2: {error}"):
        load_source(DatasetSpec(path=str(path)), None, skip_bad_rows=False)
