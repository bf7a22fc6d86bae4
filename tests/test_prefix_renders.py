"""Prefixes taken from one rendering: every prefix, with and without the generation prompt, is exactly what
rendering it gives, on every template `message_local` accepts, also with the epilogue taken from earlier
conversations where `epilogue_reads` allows it; templates that read ahead, or whose epilogue depends on the
messages, are refused, and their masks stay those of rendering every prefix."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings

from sftkit.data import template as template_module
from sftkit.data.hf_chat import epilogue_inputs as _epilogue_reads
from sftkit.data.hf_chat import renders_message_local
from sftkit.data.prefix_renders import PrefixRenders
from sftkit.data.template import (
    TemplateError,
    _generate,
    _render,
    _template_inputs,
    _template_messages,
    tokenize_conversation,
)
from tests.test_data_properties import conversations
from tests.test_template_render_reuse import MESSAGE_LOCAL, template_text

LOOP = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}</>{% endfor %}"
GENERATION_PROMPT = "{% if add_generation_prompt %}<assistant>{% endif %}"
# Accepted: state carried forward through a namespace, a prologue from the first message, an epilogue with
# an else branch, a loop over messages[1:] through a name, loop.previtem.
ACCEPTED = {
    "namespace": "{% set ns = namespace(turns=0) %}{% for message in messages %}{% set ns.turns = ns.turns + 1 %}"
    "[{{ ns.turns }}:{{ message['content'] }}]{% endfor %}" + GENERATION_PROMPT,
    "system_prologue": "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}SYS {{ messages[0]"
    "['content'] }}\n{% else %}{% set rest = messages %}{% endif %}{% for message in rest %}"
    "{{ loop.index }}{{ message['content'] }};{% endfor %}" + GENERATION_PROMPT,
    "final_eos": LOOP + "{% if add_generation_prompt %}<assistant>{% else %}{{ eos_token }}{% endif %}",
    "previous": "{% for message in messages %}{% if loop.previtem %}|{% endif %}{{ message['content'] }}"
    "{% endfor %}" + GENERATION_PROMPT,
}
# Refused: each reads something a prefix does not have, or writes it somewhere the proof does not follow.
REFUSED = {
    "length_in_prologue": "{{ messages | length }}" + LOOP + GENERATION_PROMPT,
    "truthiness_in_a_sum": "{{ (messages or []) | length }}" + LOOP,
    "last_in_body": "{% for message in messages %}{{ message['content'] }}{% if loop.last %}!{% endif %}"
    "{% endfor %}" + GENERATION_PROMPT,
    "look_ahead": "{% for message in messages %}{{ message['content'] }}{{ messages[loop.index0 + 1] }}"
    "{% endfor %}" + GENERATION_PROMPT,
    "look_ahead_through_name": "{% set all = messages %}{% for message in all %}{{ all[loop.index0 + 1] }}{% endfor %}",
    "epilogue_reads_loop_state": "{% set ns = namespace(last='') %}{% for message in messages %}"
    "{% set ns.last = message['role'] %}{{ message['content'] }}{% endfor %}"
    "{% if ns.last == 'user' %}<reply>{% endif %}",
    "generation_prompt_in_body": "{% for message in messages %}{{ message['content'] }}"
    "{% if add_generation_prompt %}?{% endif %}{% endfor %}",
    "second_message_in_prologue": "{{ messages[1] }}" + LOOP,
    "from_third": "{% for message in messages[2:] %}{{ message['content'] }}{% endfor %}",
    "filtered_loop": "{% for message in messages if message['role'] != 'system' %}{{ message['content'] }}{% endfor %}",
    "loop_else": "{% for message in messages %}{{ message['content'] }}{% else %}empty{% endfor %}",
    "two_loops": LOOP + LOOP,
    "macro": "{% macro show(m) %}{{ m['content'] }}{% endmacro %}{% for message in messages %}{{ show(message) }}"
    "{% endfor %}",
    "generation_block": "{% for message in messages %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% endfor %}",
    "reversed_scan": "{% for message in messages[::-1] %}{{ message['content'] }}{% endfor %}",
    "loop_variable_passed": "{% for message in messages %}{{ loop | string | length }}{% endfor %}",
}


# Message-local templates whose epilogue may write differently from one conversation to another: it reads a name the
# prologue sets from the first message, a clock, or goes through a filter (refused whole, conservatively).
VARYING_EPILOGUE = {
    "prologue_name": "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% else %}{% set system = '' %}{% endif %}" + LOOP + "{% if add_generation_prompt %}{{ system }}{% endif %}",
    "clock": LOOP + "{% if add_generation_prompt %}{{ strftime_now('%Y-%m-%d') }}{% endif %}",
    "filter": LOOP + "{{ eos_token | upper }}",
}


def test_the_template_shapes_are_told_apart():
    for name, template in ACCEPTED.items():
        assert renders_message_local(template), name
    for name, template in REFUSED.items():
        assert not renders_message_local(template), name
    for name, template in VARYING_EPILOGUE.items():
        assert renders_message_local(template) and _epilogue_reads(template) is None, name
    assert _epilogue_reads(ACCEPTED["final_eos"]) == {"eos_token"}
    assert _epilogue_reads(ACCEPTED["namespace"]) == frozenset()


@pytest.mark.parametrize("shared", [False, True], ids=["own_epilogue", "shared_epilogue"])
@pytest.mark.parametrize("name", [*ACCEPTED, *VARYING_EPILOGUE, *sorted(MESSAGE_LOCAL)])
def test_every_prefix_is_what_rendering_it_gives(name, shared, llama2_tokenizer):
    """With `shared`, every conversation gets the epilogues found from the first one where `epilogue_reads` allows."""
    template = ACCEPTED.get(name) or VARYING_EPILOGUE.get(name) or template_text(name, llama2_tokenizer)
    inputs = _template_inputs(llama2_tokenizer, None)
    epilogues: dict[bool, str] = {}
    if shared and _epilogue_reads(template) is None:
        pytest.skip("the epilogue may differ between conversations: never shared")

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages=conversations())
    def check(messages):
        converted = _template_messages(messages)
        try:
            prefixes = PrefixRenders(
                converted,
                functools.partial(_generate_with, template, inputs),
                functools.partial(_render_with, template, inputs),
                epilogues if shared else None,
            )
        except TemplateError:
            with pytest.raises(TemplateError):
                _render(template, converted, False, inputs)
            return
        for count in range(1, len(messages) + 1):
            for generation_prompt in (False, True):
                try:
                    expected = _render(template, converted[:count], generation_prompt, inputs)
                except TemplateError:
                    continue  # a prefix the template refuses (roles must alternate) is never asked for
                assert prefixes(count, generation_prompt) == expected, (count, generation_prompt)

    check()


def _generate_with(template, inputs, messages, generation_prompt):
    return _generate(template, messages, generation_prompt, inputs)


def _render_with(template, inputs, messages, generation_prompt):
    return _render(template, messages, generation_prompt, inputs)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_templates_mask_as_rendering_every_prefix(name, llama2_tokenizer, monkeypatch):
    template = REFUSED[name]

    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages=conversations())
    def check(messages):
        results = []
        for reuse in (True, False):
            with monkeypatch.context() as patch:
                patch.setattr(
                    template_module,
                    "assistant_spans",
                    functools.partial(template_module.assistant_spans, reuse_renders=reuse),
                )
                try:
                    results.append(tokenize_conversation(messages, template, llama2_tokenizer))
                except TemplateError as err:
                    results.append(str(err))
        assert results[0] == results[1]

    check()
