"""Property tests: random conversations through tokenize → pack → collate never lose or invent a
trained token, and masking keeps one trained run per assistant reply, whatever the content."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftkit.data.collate import collate
from sftkit.data.packing import pack_balanced, pack_best_fit_decreasing
from sftkit.data.template import BUILTIN_TEMPLATES, IGNORE_INDEX, resolve_chat_template
from sftkit.data.tokenize import TokenizeOptions, _encode, tokenize_row

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# Unicode-ish text: letters of many scripts, digits, punctuation, symbols, emoji, and whitespace.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn")), st.sampled_from(" \n\t<>|[]/")
    ),
    max_size=30,
)
REPLY = TEXT.filter(lambda text: text.strip())  # an empty reply is a bad row, rejected before tokenizing


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    """Optional system turn, then user/assistant alternating, sometimes ending on a user turn."""
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(REPLY)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(TEXT)})
    return messages


@pytest.fixture(scope="module", params=["tiny", "llama2"])
def tokenizer(request):
    return request.getfixturevalue("tiny_tokenizer" if request.param == "tiny" else "llama2_tokenizer")


def trained_runs(labels: list[int]) -> list[list[int]]:
    """The trained tokens, one list per maximal run of trained positions."""
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX):
            runs.append([])
        if label != IGNORE_INDEX:
            runs[-1].append(label)
    return runs


@PROPERTY_SETTINGS
@given(messages=conversations(), name=st.sampled_from(BUILTIN_TEMPLATES))
def test_one_trained_run_per_reply_holding_the_reply(tokenizer, messages, name):
    template = resolve_chat_template(name, tokenizer)
    row = tokenize_row({"messages": messages, "text": ""}, tokenizer, TokenizeOptions(template, max_seq_length=100_000))
    assert row["drop_reason"] == ""
    runs = trained_runs(row["labels"])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies, strict=True):
        assert reply.strip() in tokenizer.decode(run)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"], strict=True))
    assert row["response_tokens"] + row["prompt_tokens"] == row["full_length"] == len(row["input_ids"])


@PROPERTY_SETTINGS
@given(
    batch=st.lists(st.tuples(conversations(), st.sampled_from(BUILTIN_TEMPLATES)), min_size=1, max_size=6),
    max_seq_length=st.integers(16, 160),
    balanced=st.booleans(),
    rows_per_batch=st.integers(1, 4),
)
def test_pack_and_collate_never_lose_or_invent_a_trained_token(
    tokenizer, batch, max_seq_length, balanced, rows_per_batch
):
    examples = []
    for messages, name in batch:
        options = TokenizeOptions(resolve_chat_template(name, tokenizer), max_seq_length=max_seq_length)
        row = tokenize_row({"messages": messages, "text": ""}, tokenizer, options)
        assert row["length"] == min(row["full_length"], max_seq_length)
        if not row["drop_reason"]:
            examples.append(row)
    if not examples:
        return
    pack = pack_balanced if balanced else pack_best_fit_decreasing
    bins = pack([example["length"] for example in examples], max_seq_length)
    expected_targets = Counter(t for e in examples for t in e["labels"][1:] if t != IGNORE_INDEX)
    expected_tokens = Counter(t for e in examples for t in e["input_ids"])
    got_targets: Counter = Counter()
    got_tokens: Counter = Counter()
    for start in range(0, len(bins), rows_per_batch):
        rows = [[examples[i] for i in b] for b in bins[start : start + rows_per_batch]]
        tensors = collate(rows, pad_token_id=tokenizer.pad_token_id)
        targets, segments = tensors["targets"], tensors["segment_ids"]
        assert tensors["input_ids"].shape[1] <= max_seq_length
        got_targets.update(targets[targets != IGNORE_INDEX].tolist())
        got_tokens.update(tensors["input_ids"][segments != 0].tolist())
        assert (targets[segments == 0] == IGNORE_INDEX).all()  # padding never trains
    assert got_targets == expected_targets
    assert got_tokens == expected_tokens


@PROPERTY_SETTINGS
@given(
    texts=st.lists(
        st.builds("".join, st.lists(st.one_of(TEXT, st.sampled_from(["<s>", "</s>", "[INST]"])), max_size=4)),
        min_size=1,
        max_size=4,
    )
)
def test_encode_gives_what_the_tokenizer_call_gives(tokenizer, texts):
    """Token ids and offsets read from the fast tokenizer directly are exactly those of `tokenizer(...)`, and a
    backend left set to truncate is not obeyed (the tokenizer call would not truncate either)."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    expected = [(ids, [list(pair) for pair in offsets]) for ids, offsets in pairs]

    def encode() -> list:
        return [(ids.tolist(), offsets.tolist()) for ids, offsets in _encode(texts, tokenizer)]

    assert encode() == expected
    tokenizer.backend_tokenizer.enable_truncation(2)
    try:
        assert encode() == expected
    finally:
        tokenizer.backend_tokenizer.no_truncation()
