"""transformers' chat-template rendering, reached by a fast path where this transformers allows it, else the public one.

`apply_chat_template(..., tokenize=False)` compiles the template once, converts its inputs (plain JSON data, the
reasoning under its aliases) and renders. Rendering every prefix of every conversation through it repeats that
conversion per call, about half a render's cost on short templates; the fast path converts a conversation once and
calls the compiled template directly. It needs three private functions of `transformers.utils.chat_template_utils`:

    _compile_jinja_template    the compiled template in transformers' sandbox      (5.17 has it)
    _plain_template_data       inputs rebuilt as plain JSON data                  (5.17 lacks it)
    _alias_reasoning_fields    a message's reasoning under every name templates read (5.17 lacks it)

Where any is missing (they are no API and can go in any release), every render goes through the public
`render_jinja_template`, which `apply_chat_template` calls, and the one-rendering prefix reuse of prefix_renders.py is
off, as it needs the compiled template: a conversation then costs two renders per assistant turn, each linear in
its prefix. tests/test_template_fallback.py holds both paths to the same text and labels on every template fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
from transformers.utils import chat_template_utils as _hf_templates

from sftkit.data.prefix_renders import epilogue_reads, message_local

PRIVATE_FUNCTIONS = ("_compile_jinja_template", "_plain_template_data", "_alias_reasoning_fields")


def has_private_functions(module: Any) -> bool:
    """Whether `module` (transformers' chat_template_utils) has every function the fast path calls."""
    return all(callable(getattr(module, name, None)) for name in PRIVATE_FUNCTIONS)


# Read at each call: tests set it False to hold the public path to the fast one.
USE_PRIVATE = has_private_functions(_hf_templates)


def template_inputs(special_tokens: dict[str, Any], tools: list[dict] | None) -> dict[str, Any]:
    """What a template reads besides the messages, as apply_chat_template passes it: the tools, the documents
    (none) and the tokenizer's special tokens."""
    if not USE_PRIVATE:  # render_jinja_template converts them itself, where its transformers does
        return {"tools": tools, "documents": None, **special_tokens}
    return {
        "tools": _hf_templates._plain_template_data(tools),
        "documents": None,
        **_hf_templates._plain_template_data(special_tokens),
    }


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages (no None values) as apply_chat_template hands them to the template: plain JSON data, the
    reasoning under its aliases. The public path leaves that to render_jinja_template."""
    if not USE_PRIVATE:
        return messages
    return _hf_templates._alias_reasoning_fields(_hf_templates._plain_template_data(messages))


def render(template: str, messages: list[Any], add_generation_prompt: bool, inputs: dict[str, Any]) -> str:
    """The template's text for `template_messages(...)` and `template_inputs(...)`."""
    if USE_PRIVATE:
        return compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **inputs)
    others = {key: value for key, value in inputs.items() if key not in ("tools", "documents")}
    # (texts, generation indices), one text per conversation; transformers annotates the function `-> str`
    rendered: tuple[list[str], list[Any]] = _hf_templates.render_jinja_template(  # type: ignore[assignment]
        conversations=[messages],
        tools=inputs["tools"],
        documents=inputs["documents"],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **others,
    )
    return rendered[0][0]


def generate(template: str, messages: list[Any], add_generation_prompt: bool, inputs: dict[str, Any]) -> Iterator[str]:
    """`render`'s text in the pieces the template writes (fast path only: see `prefix_reuse`)."""
    yield from compiled(template).generate(messages=messages, add_generation_prompt=add_generation_prompt, **inputs)


def prefix_reuse(template: str) -> bool:
    """Whether every prefix of a conversation can be taken from one rendering (prefix_renders.py): the template
    renders each message on its own, and the compiled template is at hand to render it in pieces."""
    return USE_PRIVATE and renders_message_local(template)


@lru_cache(maxsize=64)
def renders_message_local(template: str) -> bool:
    """Whether the template renders each message on its own (prefix_renders.py), read off its syntax tree."""
    return message_local(compiled(template).environment.parse(template))


@lru_cache(maxsize=64)
def epilogue_inputs(template: str) -> frozenset[str] | None:
    """The inputs a message-local template's epilogue reads, when it writes the same for every conversation given
    them (prefix_renders.py `epilogue_reads`)."""
    return epilogue_reads(compiled(template).environment.parse(template))


@lru_cache(maxsize=64)
def compiled(template: str) -> jinja2.Template:
    """transformers' compiled template (its sandbox, filters and globals), in an overlay of its environment whose
    attribute check is remembered by (type, attribute).

    The sandbox checks every attribute a template reads (`content.strip`, `loop.index0`), and that check is most
    of a render's cost. jinja2's `is_safe_attribute` depends only on the attribute's name and on `isinstance`
    tests of the object, that is on its type: remembering it by type gives the same answer, once per type and
    attribute instead of once per access (`TypeAttributeCheck`). Everything else stays transformers'."""
    environment = _hf_templates._compile_jinja_template(template).environment.overlay()
    environment.is_safe_attribute = TypeAttributeCheck(environment.is_safe_attribute)
    return environment.from_string(template)


@dataclass
class TypeAttributeCheck:
    """A sandbox's `is_safe_attribute`, remembered by (type, attribute name). An object whose `__class__` is
    not its type (a proxy) is checked every time, as `isinstance` may then answer for it alone."""

    check: Callable[[Any, str, Any], bool]
    known: dict[tuple[type, str], bool] = field(default_factory=dict)

    def __call__(self, obj: Any, attr: str, value: Any) -> bool:
        kind = type(obj)
        if obj.__class__ is not kind:
            return self.check(obj, attr, value)
        key = (kind, attr)
        safe = self.known.get(key)
        if safe is None:
            safe = self.known[key] = self.check(obj, attr, value)
        return safe
