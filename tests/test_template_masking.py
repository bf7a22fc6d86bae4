"""Assistant-only loss: exactly the assistant replies and their end-of-turn are trained, for every
built-in template, on the real Llama-2 tokenizer (when ../shared has it) and on the tiny one.

The check decodes each run of trained tokens and compares it with what the template writes for
that reply. The one tolerated extra is a single token that straddles the end of the span, because
a tokenizer may merge across the boundary (Llama-2 reads `<|eot_id|><|start` as `... > < | ...`
with `><` one token): without the straddling token the run must be a strict prefix of the reply.
"""

from __future__ import annotations

import pytest

from sftkit.data.template import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    TemplateError,
    assistant_spans,
    render,
    render_prompt,
    resolve_chat_template,
    tokenize_conversation,
)
from tests.conftest import FIXTURES

TEMPLATES = FIXTURES / "templates"

# What each built-in template writes for an assistant reply (before `.strip()`).
REPLY_AS_RENDERED = {
    "llama2": lambda content: f"{content.strip()} </s>",
    "chatml": lambda content: f"{content}<|im_end|>",
    "llama3": lambda content: f"{content.strip()}<|eot_id|>",
    "zephyr": lambda content: f"{content}</s>",
    "mistral": lambda content: f"{content}</s>",
}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


CONVERSATIONS = {
    "one_turn": [user("What is 12 plus 30?"), assistant("The answer is 42.")],
    "three_turns": [
        user("Hello! How can I help you today?"),
        assistant("Tell me about foxes."),
        user("What does the fox do?"),
        assistant("The quick brown fox jumps over the lazy dog."),
        user("And then?"),
        assistant("It rests. Then it jumps again!"),
    ],
    "with_system": [
        system("You answer in one short sentence."),
        user("What is 2+2?"),
        assistant("It is 4."),
        user("And 3+3?"),
        assistant("Six, of course."),
    ],
    "whitespace_around_content": [
        system("  Be brief.\n"),
        user("  What is 2+2?  "),
        assistant("  It is 4.\n"),
        user("\tAnd 3+3?"),
        assistant("Six.  \n\n"),
    ],
    "reply_repeats_the_user": [user("Say: Sure"), assistant("Sure"), user("Again: Sure"), assistant("Sure")],
}


@pytest.fixture(params=["llama2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue("llama2_tokenizer" if request.param == "llama2" else "tiny_tokenizer")


def trained_runs(labels: list[int]) -> list[list[int]]:
    """Positions of each maximal run of trained labels."""
    runs: list[list[int]] = []
    previous = False
    for position, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(position)
        previous = trained
    return runs


def assert_trained_text(tokenizer, encoded: dict[str, list[int]], expected: list[str]) -> None:
    """The runs of trained tokens decode, in order, to `expected` (compared after .strip())."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(labels) == len(ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    runs = trained_runs(labels)
    decoded = [tokenizer.decode([ids[p] for p in run]).strip() for run in runs]
    assert len(runs) == len(expected), decoded
    for run, got, want in zip(runs, decoded, expected, strict=True):
        want = want.strip()
        if got == want:
            continue
        without_last = tokenizer.decode([ids[p] for p in run[:-1]]).strip()
        assert got.startswith(want) and want.startswith(without_last) and without_last != want, (got, want)


def replies(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_templates_train_exactly_the_replies_and_end_of_turn(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    template = resolve_chat_template(name, tokenizer)
    encoded = tokenize_conversation(messages, template, tokenizer)
    assert_trained_text(tokenizer, encoded, [REPLY_AS_RENDERED[name](c) for c in replies(messages)])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_render_prompt_is_the_training_text_before_the_last_reply(tokenizer, name, conversation):
    """Inference sees the very text, and the very tokens, that preceded the reply in training."""
    messages = CONVERSATIONS[conversation]
    template = resolve_chat_template(name, tokenizer)
    full, spans = assistant_spans(messages, template, tokenizer)
    prompt = render_prompt(messages[:-1], template, tokenizer)
    assert full[: spans[-1][0]] == prompt
    encoded = tokenize_conversation(messages, template, tokenizer)
    last_reply_start = trained_runs(encoded["labels"])[-1][0]
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == encoded["input_ids"][:last_reply_start]


def test_llama2_layout_exactly(llama2_tokenizer):
    """One example spelled out token by token, as the tokenize_conversation docstring draws it."""
    template = resolve_chat_template("llama2", llama2_tokenizer)
    encoded = tokenize_conversation([user("Hi"), assistant("Hello")], template, llama2_tokenizer)
    tokens = llama2_tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["<s>", "[", "INST", "]", "▁Hi", "▁[", "/", "INST", "]", "▁Hello", "▁", "</s>"]
    trained = [t for t, label in zip(tokens, encoded["labels"], strict=True) if label != IGNORE_INDEX]
    assert trained == ["▁Hello", "▁", "</s>"]


def test_llama3_merge_across_end_of_turn_is_the_only_extra(llama2_tokenizer):
    """Llama-2 has no `<|eot_id|>` token: `><` of `<|eot_id|><|start_header_id|>` is one token,
    trained because it overlaps the reply's end-of-turn. Nothing else beyond the span is."""
    template = resolve_chat_template("llama3", llama2_tokenizer)
    messages = [user("Hi"), assistant("Hello"), user("Bye"), assistant("Goodbye")]
    encoded = tokenize_conversation(messages, template, llama2_tokenizer)
    first_run = trained_runs(encoded["labels"])[0]
    tokens = llama2_tokenizer.convert_ids_to_tokens([encoded["input_ids"][p] for p in first_run])
    assert tokens[-1] == "><"
    assert llama2_tokenizer.decode([encoded["input_ids"][p] for p in first_run[:-1]]).strip() == "Hello<|eot_id|"


def test_template_that_adds_a_default_system_prompt(tokenizer):
    template = resolve_chat_template(str(TEMPLATES / "default_system.jinja"), tokenizer)
    messages = CONVERSATIONS["three_turns"]
    full, _ = assistant_spans(messages, template, tokenizer)
    assert full.startswith("<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!")
    encoded = tokenize_conversation(messages, template, tokenizer)
    assert_trained_text(tokenizer, encoded, [f"{c}</s>" for c in replies(messages)])
    prompt = render_prompt(messages[:-1], template, tokenizer)
    assert prompt.startswith("<|system|>\nYou are a helpful assistant.") and prompt.endswith("<|assistant|>\n")


@pytest.mark.parametrize("conversation", ["whitespace_around_content", "with_system"])
def test_template_that_strips_whitespace_around_content(tokenizer, conversation):
    template = resolve_chat_template(str(TEMPLATES / "trim_whitespace.jinja"), tokenizer)
    messages = CONVERSATIONS[conversation]
    full, spans = assistant_spans(messages, template, tokenizer)
    assert [full[start:end] for start, end in spans] == [f"{c.strip()}</s>" for c in replies(messages)]
    encoded = tokenize_conversation(messages, template, tokenizer)
    assert_trained_text(tokenizer, encoded, [f"{c.strip()}</s>" for c in replies(messages)])


def test_template_that_moves_the_system_prompt_masks_the_reply_not_the_user_echo(tokenizer):
    """Mistral's official layout puts the system prompt in the last user turn, so an earlier prefix
    does not render as a prefix of the whole. When a user turn contains the reply's text, the user
    text must still not be trained: the reply is the copy the end-of-turn follows."""
    template = resolve_chat_template(str(TEMPLATES / "system_last.jinja"), tokenizer)
    messages = [system("Be brief."), *CONVERSATIONS["reply_repeats_the_user"]]
    full, spans = assistant_spans(messages, template, tokenizer)
    assert full == "<s>[INST] Say: Sure[/INST]Sure</s>[INST] Be brief.\n\nAgain: Sure[/INST]Sure</s>"
    assert [full[start:end] for start, end in spans] == ["Sure</s>", "Sure</s>"]
    assert [start for start, _ in spans] == [full.index("]Sure</s>") + 1, full.rindex("Sure</s>")]
    assert_trained_text(tokenizer, tokenize_conversation(messages, template, tokenizer), ["Sure</s>", "Sure</s>"])


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_user_and_system_text_never_trained(tokenizer, name):
    """A token is trained exactly when it overlaps a reply's span: all else (system, user, headers) is masked."""
    template = resolve_chat_template(name, tokenizer)
    messages = CONVERSATIONS["with_system"]
    full, spans = assistant_spans(messages, template, tokenizer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = tokenize_conversation(messages, template, tokenizer)["labels"]
    for (start, end), label in zip(encoded["offset_mapping"], labels, strict=True):
        inside = any(start < span_end and end > span_start for span_start, span_end in spans)
        assert (label != IGNORE_INDEX) == inside, full[start:end]


def test_without_assistant_only_loss_every_token_is_trained(tokenizer):
    template = resolve_chat_template("chatml", tokenizer)
    encoded = tokenize_conversation(CONVERSATIONS["with_system"], template, tokenizer, assistant_only_loss=False)
    assert encoded["labels"] == encoded["input_ids"]


def test_template_that_rewrites_the_reply_cannot_be_masked(tiny_tokenizer):
    shouting = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{{ m['content'] | upper if m['role'] == 'assistant' else m['content'] }}{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="assistant turn 2 does not appear verbatim"):
        tokenize_conversation(CONVERSATIONS["one_turn"], shouting, tiny_tokenizer)


def test_unknown_template_name_lists_the_builtins(tiny_tokenizer):
    with pytest.raises(TemplateError, match=r"not a built-in template .*llama2, chatml, llama3, zephyr, mistral"):
        resolve_chat_template("vicuna", tiny_tokenizer)
    with pytest.raises(TemplateError, match=r"missing\.jinja.*not found"):
        resolve_chat_template("missing.jinja", tiny_tokenizer)


def test_template_error_is_a_clear_message(tiny_tokenizer):
    template = resolve_chat_template("llama2", tiny_tokenizer)
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render([user("a"), user("b")], template, tiny_tokenizer)
