"""`render` calls the compiled template directly; it must write exactly what transformers'
`apply_chat_template(..., tokenize=False)` writes, on every template we ship or test against, with tools,
tool calls and reasoning, with and without the generation prompt, and refuse what its sandbox refuses."""

from __future__ import annotations

import collections
import json
import types

import pytest
from hypothesis import HealthCheck, given, settings
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftkit.data.hf_chat import TypeAttributeCheck
from sftkit.data.template import BUILTIN_TEMPLATES, TemplateError, _for_template, render
from tests.test_data_properties import conversations
from tests.test_template_render_reuse import FIXTURES, template_text
from tests.test_tools_reasoning import REASONED, TOOLS, WEATHER


def reference(messages, template: str, tokenizer, add_generation_prompt: bool, tools=None) -> str:
    """transformers' own rendering, or the error text when it fails."""
    try:
        return tokenizer.apply_chat_template(
            [_for_template(message) for message in messages],
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:
        return f"error: {err}"


def rendered(messages, template: str, tokenizer, add_generation_prompt: bool, tools=None) -> str:
    try:
        return render(messages, template, tokenizer, add_generation_prompt, tools)
    except TemplateError as err:
        return f"error: {err}"


def same_or_both_fail(ours: str, theirs: str) -> None:
    if theirs.startswith("error: "):
        assert ours.startswith("error: "), ours
        assert theirs.removeprefix("error: ") in ours
    else:
        assert ours == theirs


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, *FIXTURES])
def test_render_writes_what_apply_chat_template_writes(name, llama2_tokenizer):
    template = template_text(name, llama2_tokenizer)

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages=conversations())
    def check(messages):
        for prompt in (False, True):
            same_or_both_fail(
                rendered(messages, template, llama2_tokenizer, prompt),
                reference(messages, template, llama2_tokenizer, prompt),
            )

    check()
    for messages, tools in ((WEATHER, TOOLS), (REASONED, None)):
        for count in range(1, len(messages) + 1):
            same_or_both_fail(
                rendered(messages[:count], template, llama2_tokenizer, False, json.dumps(tools)),
                reference(messages[:count], template, llama2_tokenizer, False, tools),
            )


@pytest.mark.parametrize(
    "body",
    [
        "{{ messages.append(messages[0]) }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages.index(messages[0]) }}{{ messages.append(messages[0]) }}",
        "{{ messages[0].keys() }}{{ messages[0].pop('role') }}",
    ],
)
def test_render_keeps_the_sandbox(body, llama2_tokenizer):
    """Templates are untrusted code: what transformers' sandbox refuses, render refuses too."""
    messages = [{"role": "user", "content": "Hi"}]
    assert reference(messages, body, llama2_tokenizer, False).startswith("error: ")
    with pytest.raises(TemplateError, match="the chat template failed"):
        render(messages, body, llama2_tokenizer)


class _Disguised:
    """An object that claims another class: `isinstance` answers for it alone, so its checks are not remembered."""

    @property
    def __class__(self):
        return types.FunctionType


def test_remembered_attribute_check_answers_as_the_sandbox():
    """The attribute check, remembered by (type, attribute), gives jinja2's answer for every object and
    attribute, allowed or refused, on the first access and from memory."""
    sandbox = ImmutableSandboxedEnvironment()
    remembered = TypeAttributeCheck(sandbox.is_safe_attribute)
    objects = [
        "text",
        {"role": "user"},
        [1],
        (1,),
        3,
        1.5,
        True,
        None,
        str,
        len,
        "".strip,
        lambda: 0,
        (x for x in ()),
        collections.deque(),
        {1},
        _Disguised(),
    ]
    attributes = [
        "strip",
        "append",
        "update",
        "pop",
        "keys",
        "items",
        "index",
        "add",
        "mro",
        "__class__",
        "_private",
        "__globals__",
        "__code__",
        "gi_frame",
        "gi_code",
        "func_code",
        "__self__",
        "role",
    ]
    for _ in range(2):
        for obj in objects:
            for attribute in attributes:
                assert remembered(obj, attribute, None) == sandbox.is_safe_attribute(obj, attribute, None), (
                    obj,
                    attribute,
                )
    assert not any(kind is _Disguised for kind, _ in remembered.known)


def test_template_messages_are_the_plain_data_transformers_makes():
    """Role-and-text messages skip transformers' conversion, which would give the very same dicts (keys in the same
    order); a str subclass, tool calls or reasoning still go through it."""
    from transformers.utils import chat_template_utils as hf

    from sftkit.data.template import _template_messages

    class Text(str):
        pass

    cases = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "tool_calls": None}],
        [{"role": "user", "content": Text("Hi")}],
        [{"role": "assistant", "content": "", "tool_calls": json.dumps(WEATHER[1]["tool_calls"])}],
        [{"role": "assistant", "content": "4", "reasoning_content": "2 + 2"}],
    ]
    for messages in cases:
        stored = [{key: value for key, value in _for_template(m).items() if value is not None} for m in messages]
        expected = hf._alias_reasoning_fields(hf._plain_template_data(stored))
        converted = _template_messages(messages)
        assert converted == expected
        assert [list(message) for message in converted] == [list(message) for message in expected]
        assert [type(value) for message in converted for value in message.values()] == [
            type(value) for message in expected for value in message.values()
        ]
