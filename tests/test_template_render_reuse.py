"""Each prefix of a conversation is rendered once, or taken from one rendering of the conversation when the
template renders each message on its own: the masks are exactly those of rendering every prefix afresh, on
every template we ship or test against. A conversation that ends with the assistant costs one render less
(its last turn-as-last is the full rendering); with a message-local template, a conversation of two or more
assistant turns costs three (the conversation once, its first message twice), and one once the template's
epilogue is known from an earlier conversation."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from sftkit.data import hf_chat
from sftkit.data import template as template_module
from sftkit.data.template import BUILTIN_TEMPLATES, TemplateError, resolve_chat_template, tokenize_conversation
from tests.test_data_properties import conversations
from tests.test_template_masking import TEMPLATES

FIXTURES = sorted(path.stem for path in TEMPLATES.glob("*.jinja"))
# Templates that render every turn the same whether or not it is last: two renders per assistant turn,
# none for the conversation itself when it ends with the assistant.
PREFIX_STABLE = {"llama2", "chatml", "llama3", "zephyr", "qwen25", "llama31", "default_system"}
# Templates whose prologue, one loop over the messages and epilogue `message_local` proves (prefix_renders.py).
MESSAGE_LOCAL = {"llama2", "chatml", "llama3", "mistral", "gemma3", "phi3", "trim_whitespace", "default_system"}


def template_text(name: str, tokenizer) -> str:
    return resolve_chat_template(name if name in BUILTIN_TEMPLATES else str(TEMPLATES / f"{name}.jinja"), tokenizer)


def counted(monkeypatch, reuse_renders: bool, messages, template: str, tokenizer):
    """(labels or the TemplateError text, how many times the template was rendered)."""
    calls = Counter()
    # The end of a turn is the template's, rendered once per template and tokenizer: not one of the conversation's.
    with contextlib.suppress(TemplateError):
        template_module.end_of_turn(template, tokenizer)
    render, generate = template_module._render, template_module._generate

    def counting_render(*args, **kwargs):
        calls["render"] += 1
        return render(*args, **kwargs)

    def counting_generate(*args, **kwargs):
        calls["render"] += 1
        return generate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(template_module, "_render", counting_render)
        patch.setattr(template_module, "_generate", counting_generate)
        patch.setattr(
            template_module,
            "assistant_spans",
            functools.partial(template_module.assistant_spans, reuse_renders=reuse_renders),
        )
        try:
            encoded = tokenize_conversation(messages, template, tokenizer)
            result = (encoded["input_ids"], encoded["labels"])
        except TemplateError as err:
            result = str(err)
    return result, calls["render"]


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, *FIXTURES])
def test_reused_renders_give_the_reference_masks(name, llama2_tokenizer, monkeypatch):
    template = template_text(name, llama2_tokenizer)
    # One rendering serves every prefix on the fast path only (hf_chat.py): the public path renders each.
    one_rendering = name in MESSAGE_LOCAL and hf_chat.USE_PRIVATE

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages=conversations())
    def check(messages):
        reference, reference_renders = counted(monkeypatch, False, messages, template, llama2_tokenizer)
        inputs = template_module._template_inputs(llama2_tokenizer, None)
        epilogue_known = bool(template_module._shared_epilogues(template, inputs))
        reused, reused_renders = counted(monkeypatch, True, messages, template, llama2_tokenizer)
        assert reused == reference
        if isinstance(reference, str):
            return
        ends_with_reply = messages[-1]["role"] == "assistant"
        turns = sum(message["role"] == "assistant" for message in messages)
        if one_rendering and turns >= 2:
            assert reused_renders == (1 if epilogue_known else 3)
        else:
            assert reused_renders == reference_renders - ends_with_reply
        if name in PREFIX_STABLE:
            assert reference_renders == 1 + 2 * turns
            assert (one_rendering and turns >= 2) or reused_renders == 1 + 2 * turns - ends_with_reply

    assert hf_chat.prefix_reuse(template) == one_rendering
    check()
