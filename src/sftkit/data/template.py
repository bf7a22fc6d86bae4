"""Chat templates: render conversations, and find exactly which tokens are the assistant's.

Assistant-only loss must work for any Jinja chat template, including ones without
`{% generation %}` markers. The rule, for every assistant turn: train exactly what the model must
generate after the inference-time generation prompt, and the end-of-turn as the full conversation
renders it; nothing the prompt supplies, nothing of other roles. Per assistant turn i:

    P_i = render(messages[:i], add_generation_prompt=True)    "<s>[INST] Hi [/INST]"
    Q_i = render(messages[:i+1])                              "<s>[INST] Hi [/INST] Hello </s>"
    trained span of turn i = Q_i[len(P_i):] without trailing whitespace   " Hello </s>"

That prefix difference holds whenever the template renders a turn the same whether or not it is last
(llama2, ChatML, Llama-3, Gemma, ...). Real templates that do not, and how the span is then taken
from the full rendering:

    final EOS (Phi-3)      <|assistant|>\nEleven.<|end|>\n<|user|>...   vs last  ...Four.<|end|>\n</s>
                           earlier turns end before the next turn's header: "Eleven.<|end|>"
    final token (harmony)  <|start|>assistant<|channel|>final<|message|>Eleven.<|end|><|start|>user...
                           vs last ...<|return|>; the channel header after the generation prompt
                           `<|start|>assistant` is trained, and `<|end|>` for earlier turns
    think (Nemotron)       prompt ends "<think>\n", the turn renders "<think></think>Eleven.":
                           the span starts where the rendering leaves the prompt: "</think>Eleven.<|im_end|>"

The next turn's header is found as the text that shares the most with the generation prompt (headers
of all roles open alike: `<|user|>`/`<|assistant|>`, `<|start|>user`/`<|start|>assistant`). A template
that moves text between turns (Mistral's system prompt in the last user turn) falls back to searching
for the reply followed by the end-of-turn. Tokens are then labelled by their character offsets in the
full rendering: a token is trained when it overlaps a trained span.

The same `render_prompt` is used for generation during training and at inference, and the
template text is saved with every checkpoint, so inference never uses a different template.
Cost: one render of the conversation plus two per assistant turn (three for a turn that ends
differently mid-conversation), each linear in the conversation's length. Every render is of a prefix of
the one conversation, so each prefix is rendered once: the last turn's "turn-as-last" is the full
rendering itself, which saves one render per conversation that ends with the assistant (most data).
When the template renders each message on its own (ChatML, Llama-2 and 3, Mistral, Gemma, Phi-3, SmolLM2's:
prefix_renders.py proves it from the template's syntax tree), every prefix comes from one rendering of the
conversation and two of its first message instead: linear in the conversation's length, not quadratic. The
messages and the other template inputs are converted once per conversation, and each render calls the
compiled template directly, its sandbox's attribute checks remembered by type (hf_chat.py; on a transformers
without the private functions that takes, renders go through its public renderer and every prefix is rendered).
Labels come from one tokenization of the full rendering: O(tokens × log spans).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sftkit.data import hf_chat
from sftkit.data.formats import DataError
from sftkit.data.prefix_renders import PrefixRenders

IGNORE_INDEX = -100
BUILTIN_TEMPLATES = ("llama2", "chatml", "llama3", "zephyr", "mistral")


class TemplateError(DataError):
    """The chat template is missing, unreadable, or cannot be masked."""


PLAIN = "plain"  # no chat template: prompt, completion, EOS as one text (base models)
CONVERSATION_FORMATS = ("messages", "sharegpt")


def resolve_chat_template(setting: str | None, tokenizer: Any) -> str:
    """The Jinja text of the template a run uses: a built-in name, a .jinja file, or the tokenizer's own.

    A tokenizer without a template (a base model) gets the plain rendering, which takes single-turn
    prompt/completion and alpaca rows; `require_chat_template` stops conversation data early."""
    if setting is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default")
        return template or _builtin(PLAIN)
    if setting in (*BUILTIN_TEMPLATES, PLAIN):
        return _builtin(setting)
    path = Path(setting)
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise TemplateError(
                f"chat_template = {setting!r}: file not found; give a path relative to the directory "
                f"you run sftkit from, or a built-in name ({', '.join(BUILTIN_TEMPLATES)})"
            )
        return path.read_text(encoding="utf-8")
    close = difflib.get_close_matches(setting, BUILTIN_TEMPLATES, n=1)
    raise TemplateError(
        f"chat_template = {setting!r}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a .jinja file"
        + (f"; did you mean '{close[0]}'?" if close else "")
    )


def _builtin(name: str) -> str:
    return resources.files("sftkit.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def is_plain(template: str) -> bool:
    return template == _builtin(PLAIN)


def describe_rendering(setting: str | None, template: str) -> str:
    """How examples become text, in words, for `data inspect`."""
    if is_plain(template):
        why = "chat_template: plain" if setting == PLAIN else "the tokenizer has no chat template"
        return f"plain text: prompt, then completion, then EOS; loss on completion + EOS ({why})"
    if setting is None:
        return "the tokenizer's chat template"
    return f"built-in chat template '{setting}'" if setting in BUILTIN_TEMPLATES else f"chat template file {setting}"


def require_chat_template(template: str, data_format: str, where: str, tokenizer: Any) -> None:
    """Conversations need a chat template: stop before tokenizing when the run has only the plain rendering."""
    if data_format in CONVERSATION_FORMATS and is_plain(template):
        name = getattr(tokenizer, "name_or_path", "")
        raise TemplateError(
            f"{where}: {data_format} data needs a chat template, but the tokenizer{f' {name}' if name else ''} "
            f"has no chat template and `chat_template` is not set; set it to one of {', '.join(BUILTIN_TEMPLATES)} "
            "or to a .jinja file (prompt_completion and alpaca data train without one, as plain text)"
        )


def render(
    messages: list[dict[str, Any]],
    template: str,
    tokenizer: Any,
    add_generation_prompt: bool = False,
    tools: list[dict] | str | None = None,
) -> str:
    """Render messages to text with the run's template (the tokenizer supplies bos/eos tokens).

    Messages may carry `tool_calls` and `reasoning_content` (stored as JSON text / plain text in the
    dataset); they reach the template as the structures hub templates expect, the reasoning under both
    names templates read (`reasoning_content`, `thinking`).

    The text is `tokenizer.apply_chat_template(..., tokenize=False)`'s: the same template in transformers'
    sandboxed environment, given the same inputs, called directly where this transformers allows it
    (hf_chat.py); `tests/test_template_render.py` holds the two to the same text.
    """
    return _render(template, messages, add_generation_prompt, _template_inputs(tokenizer, tools))


def _template_inputs(tokenizer: Any, tools: list[dict] | str | None) -> dict[str, Any]:
    """What a template reads besides the messages, as apply_chat_template passes it: the tools, the documents
    (none) and the tokenizer's special tokens. The same for every prefix of a conversation."""
    return hf_chat.template_inputs(tokenizer.special_tokens_map, _parse_tools(tools))


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, inputs: dict[str, Any]) -> str:
    try:
        if not messages:
            raise ValueError("the conversation has no message")
        converted = list(messages) if isinstance(messages, _TemplateMessages) else _template_messages(messages)
        return hf_chat.render(template, converted, add_generation_prompt, inputs)
    except Exception as err:  # jinja errors and raise_exception() from the template itself
        raise _failed(err) from None


def _generate(template: str, messages: list[Any], add_generation_prompt: bool, inputs: dict[str, Any]) -> Iterator[str]:
    """`_render`'s text in the pieces the template writes, for messages already in the template's form."""
    try:
        yield from hf_chat.generate(template, messages, add_generation_prompt, inputs)
    except Exception as err:
        raise _failed(err) from None


def _failed(err: Exception) -> TemplateError:
    return TemplateError(
        f"the chat template failed on this conversation: {err}; "
        "fix the template set by `chat_template`, or the conversation"
    )


# E(g) by g, for message-local templates whose epilogue `hf_chat.epilogue_inputs` proves to depend on the inputs alone:
# keyed by the template and the values of the inputs it reads, found from one conversation's first message, then taken
# by every other conversation instead of rendering its first message twice.
_EPILOGUES: dict[tuple[str, str], dict[bool, str]] = {}


def _shared_epilogues(template: str, inputs: dict[str, Any]) -> dict[bool, str] | None:
    reads = hf_chat.epilogue_inputs(template)
    if reads is None:
        return None
    if len(_EPILOGUES) >= 256:  # tools differ from row to row in some datasets: keep the table small
        _EPILOGUES.clear()
    key = (template, repr([(name, inputs[name]) for name in sorted(reads) if name in inputs]))
    return _EPILOGUES.setdefault(key, {})


class _TemplateMessages(list):
    """Messages already in the template's input form (`_template_messages`): `render` takes them as they are,
    so the prefixes of one conversation are converted once, not once per render."""


def _template_messages(messages: list[dict[str, Any]]) -> _TemplateMessages:
    """Stored messages as apply_chat_template hands them to the template: plain JSON data, no None values,
    the reasoning under its aliases. Messages of a role and a text alone (most data) are that already."""
    converted = [
        {key: value for key, value in _for_template(message).items() if value is not None} for message in messages
    ]
    if all(message.keys() <= {"role", "content"} and _all_str(message.values()) for message in converted):
        return _TemplateMessages(converted)
    return _TemplateMessages(hf_chat.template_messages(converted))


def _all_str(values: Iterable[Any]) -> bool:
    """Whether every value is exactly a `str` (not a subclass, which the plain-data conversion would turn into one)."""
    return all(type(value) is str for value in values)


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """One stored message as a template expects it: empty optional fields left out."""
    out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = json.loads(calls) if isinstance(calls, str) else calls
    reasoning = message.get("reasoning_content") or message.get("thinking")
    if reasoning:
        out["reasoning_content"] = out["thinking"] = reasoning
    return out


def _parse_tools(tools: list[dict] | str | None) -> list[dict] | None:
    if isinstance(tools, str):
        return json.loads(tools) if tools else None
    return tools or None


def render_prompt(
    messages: list[dict[str, Any]], template: str, tokenizer: Any, tools: list[dict] | str | None = None
) -> str:
    """The prompt to generate from: the conversation so far plus the assistant header. Used in training
    (samples) and at inference, so both see the very same text."""
    return render(messages, template, tokenizer, add_generation_prompt=True, tools=tools)


def assistant_spans(
    messages: list[dict[str, Any]],
    template: str,
    tokenizer: Any,
    tools: list[dict] | str | None = None,
    train_on_reasoning: bool = True,
    reuse_renders: bool = True,
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans [start, end) to train on, in order.

    Renders the whole conversation once and, per assistant turn, the prompt and the turn-as-last
    (two renders a turn; one more only for a turn that ends differently mid-conversation), each prefix
    once: the turn-as-last of a final assistant turn is the full rendering. `reuse_renders=False` renders
    every prefix afresh (the reference the tests hold the reuse to; the spans are the same).
    `train_on_reasoning=False` leaves out the reasoning text as rendered (the turn's headers, think tags,
    answer and end-of-turn stay trained), so a turn may give two spans.
    """
    messages = [_for_template(message) for message in messages]
    renderer = _Renderer(
        template, tokenizer, _template_inputs(tokenizer, tools), _template_messages(messages), reuse_renders
    )
    full = renderer(len(messages))
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = renderer(index, add_generation_prompt=True)
        alone = renderer(index + 1)
        span = _span_after_prompt(full, prompt, alone, messages, index, renderer)
        if span is None:
            span = _span_by_search(full, message["content"].strip(), cursor, index, template, tokenizer)
        start, end = span
        reasoning = (message.get("reasoning_content") or message.get("thinking") or "").strip()
        at = full.find(reasoning, start, end) if reasoning and not train_on_reasoning else -1
        if at >= 0:  # train the turn around its reasoning text, not the reasoning itself
            if at > start:
                spans.append((start, at))
            start = at + len(reasoning)
        if end > start:
            spans.append((start, end))
        cursor = end
    return full, spans


@dataclass
class _Renderer:
    """`render` of the prefixes of one conversation, its messages and other inputs converted for the template once.

    Each prefix is kept by (length, add_generation_prompt): a template is a function of its messages, so a
    prefix asked for twice (the full conversation, and the turn-as-last of its final assistant turn) is
    rendered once. `reuse=False` renders every time (the reference)."""

    template: str
    tokenizer: Any
    inputs: dict[str, Any]  # _template_inputs
    messages: _TemplateMessages
    reuse: bool = True
    _rendered: dict[tuple[int, bool], str] = field(default_factory=dict)

    _prefixes: PrefixRenders | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # From two assistant turns on, one rendering of the conversation and two of its first message
        # (PrefixRenders) cost less than rendering each turn's prefixes.
        turns = sum(message["role"] == "assistant" for message in self.messages)
        if self.reuse and turns >= 2 and hf_chat.prefix_reuse(self.template):
            self._prefixes = PrefixRenders(
                self.messages,
                lambda messages, g: _generate(self.template, messages, g, self.inputs),
                lambda messages, g: _render(self.template, _TemplateMessages(messages), g, self.inputs),
                _shared_epilogues(self.template, self.inputs),
            )

    def __call__(self, count: int, add_generation_prompt: bool = False) -> str:
        """The rendering of the first `count` messages."""
        key = (count, add_generation_prompt)
        if key in self._rendered:
            return self._rendered[key]
        text = self._prefixes(count, add_generation_prompt) if self._prefixes is not None else None
        if text is None:
            text = _render(self.template, _TemplateMessages(self.messages[:count]), add_generation_prompt, self.inputs)
        if self.reuse:
            self._rendered[key] = text
        return text


def _span_after_prompt(
    full: str, prompt: str, alone: str, messages: list[dict[str, Any]], index: int, renderer: _Renderer
) -> tuple[int, int] | None:
    """(start, end) of the text generated after `prompt`, or None when the prompt is not the
    start of this turn in the full rendering (a template that moves text between turns).

    start: where the full rendering leaves the prompt. Usually the prompt's end; earlier when the generation
    prompt writes what the model must generate in the turn's place (`<think>\\n` against `<think></think>`).
    end: after the end-of-turn as the full rendering writes it. That is the turn's ending when last, unless the
    template ends the last turn differently (an EOS after the last message only, `<|return|>` against
    `<|end|>`); then it is the text before the next turn's header, found as the header that shares the most
    with the generation prompt.
    """
    content, before = messages[index]["content"].strip(), messages[:index]
    if full.startswith(alone) and alone.startswith(prompt) and content in alone[len(prompt) :]:
        # Prefix-stable: the turn renders the same as the last message and inside the conversation.
        return len(prompt), len(alone.rstrip())
    start = _common_prefix_length(prompt, full)
    supplied = next((m["content"].strip() for m in reversed(before) if m["content"].strip()), "")
    if supplied and prompt.rfind(supplied) + len(supplied) > start:
        return None  # the full rendering departs from the prompt before its last message ends
    shared = _common_prefix_length(alone, full)
    in_alone = _reply_in_alone(alone, content, renderer.template, renderer.tokenizer)
    ending: str | None = alone[in_alone + len(content) :].rstrip() if content and in_alone >= 0 else ""
    if content and start <= in_alone and in_alone + len(content) <= shared:
        reply_start = in_alone
    elif content:  # the first copy that the turn's ending follows ("0" of "</think>0<|im_end|>", not of a header)
        reply_start = first = full.find(content, start)
        while ending and reply_start >= 0 and not full.startswith(ending, reply_start + len(content)):
            reply_start = full.find(content, reply_start + 1)
        reply_start = first if reply_start < 0 else reply_start
    else:
        reply_start = start
    if reply_start < 0:
        return None
    reply_end = reply_start + len(content)
    if ending and full.startswith(ending, reply_end):
        return start, reply_end + len(ending)
    conversation_so_far = _without_final_eos(renderer(index), renderer.tokenizer) if before else ""
    generation_prompt = prompt[_common_prefix_length(prompt, conversation_so_far) :]
    # The next turn's header lies before its content.
    following = messages[index + 1]["content"].strip() if index + 1 < len(messages) else ""
    bound = full.find(following, reply_end) if following else -1
    if bound < 0 and generation_prompt:  # no content to look for: stop at the next assistant header
        bound = full.find(generation_prompt, reply_end)
    ending = _ending_before_next_header(full[reply_end : bound if bound >= 0 else len(full)], generation_prompt)
    if ending is None:
        ending = _end_of_turn(renderer.template, renderer.tokenizer, full[reply_end:])
    return start, reply_end + len(ending)


def _reply_in_alone(alone: str, content: str, template: str, tokenizer: Any) -> int:
    """Where the reply's text lies in the turn rendered as the last message: the last copy that the
    template's end-of-turn follows. A reply may also occur inside the markup after it ("|" or ">" in
    "<|im_end|>") or in its reasoning; the last copy alone could be one of those."""
    at = alone.rfind(content)
    try:
        suffix = end_of_turn(template, tokenizer).strip() if content else ""
    except TemplateError:  # a template that rewrites replies: the search after this one says so
        return at
    while content and at >= 0:
        rest = alone[at + len(content) :].lstrip()
        if rest.startswith(suffix) if suffix else not rest:
            return at
        at = alone.rfind(content, 0, at + len(content) - 1)
    return alone.rfind(content)


def _span_by_search(full: str, content: str, cursor: int, index: int, template: str, tokenizer: Any) -> tuple[int, int]:
    """Template not prefix-stable (e.g. it moves the system prompt into the last user turn): find the reply
    in the full text after the previous span, and extend it over the end-of-turn the template emits."""
    if not content:
        raise TemplateError(
            f"assistant turn {index + 1} has no text (tool calls only) and the template renders earlier turns "
            "differently once later ones follow, so its span cannot be found; use a template that renders each "
            "turn the same whatever follows"
        )
    start = full.find(content, cursor)
    # A user turn may quote the reply ("Say: Sure" → "Sure"): take the first copy that the
    # end-of-turn follows, so user text is never trained.
    ended = start
    while ended >= 0 and not _end_of_turn(template, tokenizer, full[ended + len(content) :]):
        ended = full.find(content, ended + 1)
    start = ended if ended >= 0 else start
    if start < 0:
        raise TemplateError(
            f"assistant turn {index + 1} does not appear verbatim in the rendered text, so it cannot be "
            "masked; use a template that renders assistant content as given"
        )
    end = start + len(content)
    end += len(_end_of_turn(template, tokenizer, full[end:]))
    return start, end


def _common_prefix_length(a: str, b: str) -> int:
    # when one string starts the other, the whole of the shorter one
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _without_final_eos(text: str, tokenizer: Any) -> str:
    """`text` without the EOS a template writes after the last message only (Phi-3's `<|end|>\\n</s>`)."""
    eos = getattr(tokenizer, "eos_token", None)
    stripped = text.rstrip()
    return stripped[: -len(eos)] if eos and stripped.endswith(eos) else text


def _ending_before_next_header(following: str, generation_prompt: str) -> str | None:
    """The end-of-turn at the start of `following` (the text after a reply, then the next turn): everything
    before the next turn's header. Headers of all roles open alike (`<|start|>user` / `<|start|>assistant`,
    `<|user|>` / `<|assistant|>`), so the header is the last place that shares the most with the generation
    prompt. None when nothing does (no generation prompt)."""
    best_length, best_at = 0, -1
    first = generation_prompt[:1]
    at = following.find(first) if first else -1
    while at >= 0:
        length = _common_prefix_length(following[at : at + len(generation_prompt)], generation_prompt)
        if length >= best_length:
            best_length, best_at = length, at
        at = following.find(first, at + 1)
    return following[:best_at].rstrip() if best_length else None


_END_OF_TURN: dict[tuple[str, int], tuple[Any, str]] = {}  # (template, id(tokenizer)) → (tokenizer, end of turn)


def end_of_turn(template: str, tokenizer: Any) -> str:
    """The text a template writes right after an assistant reply (e.g. `<|im_end|>`, ` </s>`), trailing
    whitespace removed: what generation must emit to stop. Rendered once per template and tokenizer (the
    tokenizer is held with the answer, so a reused id never finds another tokenizer's)."""
    key = (template, id(tokenizer))
    cached = _END_OF_TURN.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    if len(_END_OF_TURN) >= 16:
        _END_OF_TURN.clear()
    _END_OF_TURN[key] = (tokenizer, _render_end_of_turn(template, tokenizer))
    return _END_OF_TURN[key][1]


def _render_end_of_turn(template: str, tokenizer: Any) -> str:
    probe = [{"role": "user", "content": "\x00q"}, {"role": "assistant", "content": "\x00a"}]
    text = render(probe, template, tokenizer)
    at = text.find("\x00a")
    if at < 0:
        raise TemplateError(
            "the chat template does not write an assistant reply as given (a user turn, then an "
            "assistant turn, lose the reply), so the end of a turn cannot be found; fix the template "
            "set by `chat_template`"
        )
    return text[at + 2 :].rstrip()


def _end_of_turn(template: str, tokenizer: Any, following: str) -> str:
    """The whitespace and end-of-turn at the start of `following`, if it starts with the end-of-turn."""
    suffix = end_of_turn(template, tokenizer).lstrip()
    stripped = following.lstrip()
    if not suffix or not stripped.startswith(suffix):
        return ""
    return following[: len(following) - len(stripped)] + suffix


def tokenize_conversation(
    messages: list[dict[str, Any]],
    template: str,
    tokenizer: Any,
    assistant_only_loss: bool = True,
    tools: list[dict] | str | None = None,
    train_on_reasoning: bool = True,
) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX where masked) for one conversation.

    text    <s>[INST] Hi [/INST] Hello </s>
    tokens  <s> [ INST ] ▁Hi ▁[ / INST ] ▁Hello ▁ </s>
    labels  -   - -    - -   -  - -    - ▁Hello ▁ </s>
    """
    full, spans = assistant_spans(messages, template, tokenizer, tools, train_on_reasoning)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    if not assistant_only_loss:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    trained = trained_tokens(np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2), spans)
    return {"input_ids": input_ids, "labels": np.where(trained, input_ids, IGNORE_INDEX).tolist()}


def trained_tokens(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """(tokens,) bool: which tokens to train, from their character `offsets` (tokens, 2) and the trained
    character `spans` (sorted, disjoint). A token is trained when it overlaps a span; a zero-width token
    when its position lies in one. O(tokens × log spans), vectorised.

        spans    [6, 12)           text  "[INST] Hello </s>"
        offsets  (0,6) (6,7) (7,12)  →   False True True
    """
    if not spans or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    bounds = np.asarray(spans, dtype=np.int64)  # (spans, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # The span each token is held against: the first that ends after the token's start (or any earlier
    # token's start: offsets never move back, but if they did the scan would not either).
    index = np.searchsorted(bounds[:, 1], np.maximum.accumulate(starts), side="right")
    inside = index < len(bounds)
    span_start = bounds[np.minimum(index, len(bounds) - 1), 0]
    return inside & np.where(starts == ends, starts >= span_start, ends > span_start)
