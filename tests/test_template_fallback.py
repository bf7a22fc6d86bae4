"""Chat rendering without transformers' private functions: the public path (`render_jinja_template`, what
`apply_chat_template` calls) gives the very text and labels of the fast path, on every template fixture and
built-in template, for plain, system, whitespace, tool-call and reasoning conversations, and fails alike.

transformers 5.17 lacks two of the three private functions the fast path calls (hf_chat.py), so there the
public path is the only one; here both run on the same transformers and must agree exactly."""

from __future__ import annotations

import types

import pytest
from transformers.utils import chat_template_utils

from sftkit.data import hf_chat
from sftkit.data.template import (
    BUILTIN_TEMPLATES,
    TemplateError,
    render_prompt,
    resolve_chat_template,
    tokenize_conversation,
)
from tests.test_template_masking import CONVERSATIONS, TEMPLATES
from tests.test_tools_reasoning import REASONED, TOOLS, WEATHER

pytestmark = pytest.mark.skipif(
    not hf_chat.USE_PRIVATE, reason="this transformers lacks the fast path's private functions: public path only"
)
TEMPLATE_NAMES = [*BUILTIN_TEMPLATES, *sorted(path.stem for path in TEMPLATES.glob("*.jinja"))]
CASES = {**{name: (messages, None) for name, messages in CONVERSATIONS.items()}}
CASES.update(tool_calls=(WEATHER, TOOLS), reasoning=(REASONED, None))


@pytest.fixture(params=["llama2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue("llama2_tokenizer" if request.param == "llama2" else "tiny_tokenizer")


def public_only(monkeypatch) -> None:
    """Render as on a transformers without the private functions: the flag off, and hf_chat left with the
    public names of chat_template_utils alone, so that any private call on this path fails."""
    public = types.SimpleNamespace(**{k: v for k, v in vars(chat_template_utils).items() if not k.startswith("_")})
    assert not hf_chat.has_private_functions(public)
    monkeypatch.setattr(hf_chat, "_hf_templates", public)
    monkeypatch.setattr(hf_chat, "USE_PRIVATE", False)
    monkeypatch.setattr(hf_chat, "compiled", None)  # the compiled template is the fast path's alone


def outcomes(template: str, tokenizer) -> dict:
    """Every conversation's text, prompt and labels (with and without reasoning), or the error it raises."""
    results = {}
    for case, (messages, tools) in CASES.items():
        for train_on_reasoning in (True, False):
            try:
                results[case, train_on_reasoning] = (
                    tokenize_conversation(
                        messages, template, tokenizer, tools=tools, train_on_reasoning=train_on_reasoning
                    ),
                    render_prompt(messages[:-1], template, tokenizer, tools=tools),
                )
            except TemplateError as err:
                results[case, train_on_reasoning] = str(err)
    return results


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_public_path_gives_the_fast_paths_text_and_labels(monkeypatch, tokenizer, name):
    path = TEMPLATES / f"{name}.jinja"
    template = resolve_chat_template(str(path) if path.exists() else name, tokenizer)
    fast = outcomes(template, tokenizer)
    assert any(not isinstance(result, str) for result in fast.values())  # the template renders some case
    public_only(monkeypatch)
    assert outcomes(template, tokenizer) == fast


def test_public_path_text_is_apply_chat_template(monkeypatch, tiny_tokenizer):
    """On the public path `render` is still `apply_chat_template(..., tokenize=False)`, tools included."""
    public_only(monkeypatch)
    template = resolve_chat_template(str(TEMPLATES / "qwen25.jinja"), tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(
        WEATHER[:-1], tools=TOOLS, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert render_prompt(WEATHER[:-1], template, tiny_tokenizer, tools=TOOLS) == expected
