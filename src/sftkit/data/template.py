"""Chat templates: render conversations, and find exactly which tokens are the assistant's.

Assistant-only loss must work for any Jinja chat template, including ones without
`{% generation %}` markers. We find each assistant turn by *prefix difference*:

    P_i = render(messages[:i], add_generation_prompt=True)    "<s>[INST] Hi [/INST]"
    Q_i = render(messages[:i+1])                              "<s>[INST] Hi [/INST] Hello </s>"
    trained span of turn i = Q_i[len(P_i):] without trailing whitespace   " Hello </s>"

so the span holds the reply plus the template's end-of-turn token(s) and nothing of the
scaffolding, whatever the template adds (default system prompts, stripped whitespace, headers).
Tokens are then labelled by their character offsets in the full rendering: a token is trained
when it overlaps a trained span.

The same `render_prompt` is used for generation during training and at inference, and the
template text is saved with every checkpoint, so inference never uses a different template.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

from sftkit.data.formats import DataError

IGNORE_INDEX = -100
BUILTIN_TEMPLATES = ("llama2", "chatml", "llama3", "zephyr", "mistral")


class TemplateError(DataError):
    """The chat template is missing, unreadable, or cannot be masked."""


def resolve_chat_template(setting: str | None, tokenizer: Any) -> str:
    """The Jinja text of the template a run uses: a built-in name, a .jinja file, or the tokenizer's own."""
    if setting is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default")
        if not template:
            name = getattr(tokenizer, "name_or_path", "")
            raise TemplateError(
                f"the tokenizer{f' {name}' if name else ''} has no chat template and `chat_template` is not set; "
                "set it to one of "
                f"{', '.join(BUILTIN_TEMPLATES)} or to a .jinja file")
        return template
    if setting in BUILTIN_TEMPLATES:
        return resources.files("sftkit.templates").joinpath(f"{setting}.jinja").read_text(encoding="utf-8")
    path = Path(setting)
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise TemplateError(f"chat_template = {setting!r}: file not found; give a path relative to the directory "
                                f"you run sftkit from, or a built-in name ({', '.join(BUILTIN_TEMPLATES)})")
        return path.read_text(encoding="utf-8")
    close = difflib.get_close_matches(setting, BUILTIN_TEMPLATES, n=1)
    raise TemplateError(
        f"chat_template = {setting!r}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a .jinja file"
        + (f"; did you mean '{close[0]}'?" if close else ""))


def render(messages: list[dict[str, str]], template: str, tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """Render messages to text with the run's template (the tokenizer supplies bos/eos tokens)."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja errors and raise_exception() from the template itself
        raise TemplateError(f"the chat template failed on this conversation: {err}; "
                            "fix the template set by `chat_template`, or the conversation") from None


def render_prompt(messages: list[dict[str, str]], template: str, tokenizer: Any) -> str:
    """The prompt to generate from: the conversation so far plus the assistant header. Used in training
    (samples) and at inference, so both see the very same text."""
    return render(messages, template, tokenizer, add_generation_prompt=True)


def assistant_spans(messages: list[dict[str, str]], template: str, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans [start, end) to train on (reply + end-of-turn)."""
    full = render(messages, template, tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:index], template, tokenizer, add_generation_prompt=True)
        upto = render(messages[: index + 1], template, tokenizer)
        content = message["content"].strip()
        if full.startswith(upto) and upto.startswith(prefix) and content in upto[len(prefix):]:
            start, end = len(prefix), len(upto.rstrip())
        else:
            # Template not prefix-stable (e.g. it moves the system prompt): find the reply in the full
            # text after the previous span, and extend it over the end-of-turn the template emits.
            start = full.find(content, cursor)
            # A user turn may quote the reply ("Say: Sure" → "Sure"): take the first copy that the
            # end-of-turn follows, so user text is never trained.
            ended = start
            while ended >= 0 and not _end_of_turn(template, tokenizer, full[ended + len(content):]):
                ended = full.find(content, ended + 1)
            start = ended if ended >= 0 else start
            if start < 0:
                raise TemplateError(
                    f"assistant turn {index + 1} does not appear verbatim in the rendered text, so it cannot be "
                    "masked; use a template that renders assistant content as given")
            end = start + len(content)
            end += len(_end_of_turn(template, tokenizer, full[end:]))
        if end > start:
            spans.append((start, end))
        cursor = end
    return full, spans


def end_of_turn(template: str, tokenizer: Any) -> str:
    """The text a template writes right after an assistant reply (e.g. `<|im_end|>`, ` </s>`), trailing
    whitespace removed: what generation must emit to stop."""
    probe = [{"role": "user", "content": "\x00q"}, {"role": "assistant", "content": "\x00a"}]
    text = render(probe, template, tokenizer)
    return text[text.index("\x00a") + 2:].rstrip()


def _end_of_turn(template: str, tokenizer: Any, following: str) -> str:
    """The whitespace and end-of-turn at the start of `following`, if it starts with the end-of-turn."""
    suffix = end_of_turn(template, tokenizer).lstrip()
    stripped = following.lstrip()
    if not suffix or not stripped.startswith(suffix):
        return ""
    return following[: len(following) - len(stripped)] + suffix


def tokenize_conversation(messages: list[dict[str, str]], template: str, tokenizer: Any,
                          assistant_only_loss: bool = True) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX where masked) for one conversation.

        text    <s>[INST] Hi [/INST] Hello </s>
        tokens  <s> [ INST ] ▁Hi ▁[ / INST ] ▁Hello ▁ </s>
        labels  -   - -    - -   -  - -    - ▁Hello ▁ </s>
    """
    full, spans = assistant_spans(messages, template, tokenizer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    if not assistant_only_loss:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        # A token is trained when it overlaps the span; zero-width tokens count by position.
        if (start < span_end and end > span_start) or (start == end and span_start <= start < span_end):
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(text: str, tokenizer: Any) -> dict[str, list[int]]:
    """Plain text: every token trained, BOS first when the tokenizer has one, EOS last."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids = [*ids, tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}
