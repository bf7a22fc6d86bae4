"""Masking on templates whose turns render differently when last, or whose generation prompt differs
from the turn as rendered: what is trained is exactly what the model must generate after the
generation prompt, with the end-of-turn as the full conversation renders it.

Fixture templates, one per kind (tests/fixtures/templates/):

    phi3       final EOS     `<|end|>` after every turn, `</s>` after the last message only
    harmony    final token   `<|return|>` ends the last turn, `<|end|>` earlier ones; channel header
    think      think block   generation prompt opens `<think>`, past turns render `<think></think>`
    deepseek   think prompt  generation prompt opens `<think>`, past replies render without it
    gemma3     role rename   the assistant is `model`, the system prompt joins the first user turn
    llama31    system header knowledge-date system turn, tools in the first user turn
    qwen25     default system ChatML with a default system prompt, tools in the system turn
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftkit.data.template import (
    IGNORE_INDEX,
    assistant_spans,
    render_prompt,
    resolve_chat_template,
    tokenize_conversation,
)
from tests.test_data_properties import conversations
from tests.test_template_masking import CONVERSATIONS, TEMPLATES, replies, trained_runs

# What must be generated for a reply after the generation prompt: (earlier turn, last turn).
GENERATED = {
    "phi3": (lambda c: f"{c}<|end|>", lambda c: f"{c}<|end|>\n</s>"),
    "harmony": (
        lambda c: f"<|channel|>final<|message|>{c}<|end|>",
        lambda c: f"<|channel|>final<|message|>{c}<|return|>",
    ),
    "think": (lambda c: f"</think>{c.strip()}<|im_end|>", lambda c: f"\n</think>\n{c.strip()}<|im_end|>"),
    "deepseek": (lambda c: f"{c}<｜end▁of▁sentence｜>",) * 2,
    "gemma3": (lambda c: f"{c.strip()}<end_of_turn>",) * 2,
    "llama31": (lambda c: f"{c.strip()}<|eot_id|>",) * 2,
    "qwen25": (lambda c: f"{c}<|im_end|>",) * 2,
}
MULTI_TURN = ["three_turns", "with_system"]


@pytest.fixture(params=["llama2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue("llama2_tokenizer" if request.param == "llama2" else "tiny_tokenizer")


def fixture_template(name: str, tokenizer) -> str:
    return resolve_chat_template(str(TEMPLATES / f"{name}.jinja"), tokenizer)


def assert_generated_text(tokenizer, encoded: dict[str, list[int]], expected: list[str]) -> None:
    """Each run of trained tokens decodes to its expected text, give or take one token straddling either end
    (Llama-2 reads `<think></think>` as `<`, `think`, `></`, ...: the `></` is half prompt, half reply)."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    runs = trained_runs(labels)
    assert len(runs) == len(expected), [tokenizer.decode([ids[p] for p in run]) for run in runs]

    def decode(tokens: list[int]) -> str:  # sentencepiece decodes DeepSeek's `▁` as a space
        return tokenizer.decode(tokens).replace("▁", " ").strip()

    for run, want in zip(runs, expected, strict=True):
        tokens, want = [ids[p] for p in run], want.replace("▁", " ").strip()
        got = decode(tokens)
        assert want in got, (got, want)
        if not got.startswith(want):
            assert want not in decode(tokens[1:]), (got, want)
        if not got.endswith(want):
            assert want not in decode(tokens[:-1]), (got, want)


def expected_spans(name: str, messages: list[dict]) -> list[str]:
    earlier, last = GENERATED[name]
    contents = replies(messages)
    return [earlier(c) for c in contents[:-1]] + [last(contents[-1])]


@pytest.mark.parametrize("conversation", MULTI_TURN)
@pytest.mark.parametrize("name", GENERATED)
def test_spans_are_what_the_model_generates_after_the_generation_prompt(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    template = fixture_template(name, tokenizer)
    full, spans = assistant_spans(messages, template, tokenizer)
    assert [full[start:end] for start, end in spans] == expected_spans(name, messages)
    for index, (start, _) in enumerate(spans):
        # Everything before a span is what the prompt for that turn supplies (up to where the prompt
        # writes text the model must produce itself, such as `<think>\n` against `<think></think>`).
        turn = [i for i, m in enumerate(messages) if m["role"] == "assistant"][index]
        prompt = render_prompt(messages[:turn], template, tokenizer)
        assert full[:start] == prompt[:start]
        assert prompt[start:] == "" or not full[start:].startswith(prompt[start:])


@pytest.mark.parametrize("conversation", MULTI_TURN)
@pytest.mark.parametrize("name", GENERATED)
def test_trained_tokens_decode_to_the_generated_text(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    encoded = tokenize_conversation(messages, fixture_template(name, tokenizer), tokenizer)
    assert_generated_text(tokenizer, encoded, expected_spans(name, messages))


@pytest.mark.parametrize("name", GENERATED)
def test_no_token_of_another_role_is_trained(tokenizer, name):
    """A trained token overlaps an assistant span; no trained token holds user or system text."""
    messages = CONVERSATIONS["with_system"]
    template = fixture_template(name, tokenizer)
    full, spans = assistant_spans(messages, template, tokenizer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = tokenize_conversation(messages, template, tokenizer)["labels"]
    assert len(trained_runs(labels)) == len(replies(messages))
    for (start, end), label in zip(encoded["offset_mapping"], labels, strict=True):
        inside = any(start < span_end and end > span_start for span_start, span_end in spans)
        assert (label != IGNORE_INDEX) == inside, full[start:end]
    other = [m["content"] for m in messages if m["role"] != "assistant"]
    for start, end in spans:
        assert not any(text in full[start:end] for text in other)


PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(messages=conversations(), name=st.sampled_from(sorted(GENERATED)))
def test_any_content_gives_one_trained_run_per_reply(tiny_tokenizer, messages, name):
    """Random text (markup characters included) never merges or splits turns on these templates."""
    encoded = tokenize_conversation(messages, fixture_template(name, tiny_tokenizer), tiny_tokenizer)
    runs = trained_runs(encoded["labels"])
    assert len(runs) == len(replies(messages))
    for run, reply in zip(runs, replies(messages), strict=True):
        assert reply.strip() in tiny_tokenizer.decode([encoded["input_ids"][p] for p in run])


@pytest.mark.parametrize("reply", ["|", "im_end", "e", ">"])
def test_a_reply_that_also_occurs_in_the_markup_trains_only_itself(tiny_tokenizer, reply):
    """A reply found again inside the end-of-turn markup ("|" in "<|im_end|>") is located where it is: on a
    template that renders earlier turns differently, the last copy in the turn used to be taken, and the span
    ran on over the next user turn (found by the property test above with empty user turns)."""
    messages = [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "0"},
        {"role": "user", "content": ""},
    ]
    template = fixture_template("think", tiny_tokenizer)
    full, spans = assistant_spans(messages, template, tiny_tokenizer)
    assert [full[start:end] for start, end in spans] == [f"</think>{reply}<|im_end|>", "</think>0<|im_end|>"]
