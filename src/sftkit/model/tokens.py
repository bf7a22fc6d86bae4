"""Which token rows to train beside LoRA: the `trainable_tokens` setting resolved to token ids.

LoRA adapts linear layers only, so the embedding and output-head rows of tokens the base never
trained stay as they were: a chat token such as `<|im_end|>` that a base model never saw keeps a
random or untrained row, and the model cannot learn to emit it. Training those few rows (peft's
`trainable_token_indices`) fixes that at the cost of 2 × hidden parameters per token.

`auto` picks the template's special tokens: the added/special tokens of the tokenizer that the chat
template writes when it renders a short conversation (with a system turn where it accepts one) and
its generation prompt; e.g. ChatML gives `<|im_start|>` and `<|im_end|>`, the llama2 template `<s>`
and `</s>`. Cost: one rendering and tokenization of a four-message conversation.
"""

from __future__ import annotations

from typing import Any

from sftkit.data.template import TemplateError, render
from sftkit.model.load import ModelError

# A conversation to render, then shorter ones for templates that reject a system turn or several turns
# (the plain rendering of base models takes one prompt and one completion).
PROBES = (
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
)


def template_special_tokens(template: str, tokenizer: Any) -> list[int]:
    """Ids of the special (or added) tokens the template renders, in id order; the pad token excluded."""
    for messages in PROBES:
        try:
            text = render(messages, template, tokenizer, add_generation_prompt=messages[-1]["role"] == "user")
            break
        except TemplateError:
            continue
    else:
        raise ModelError(
            "trainable_tokens = 'auto': the chat template renders none of the probe conversations; "
            "list the tokens instead, e.g. trainable_tokens: ['<|im_end|>']"
        )
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    rendered = set(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted((rendered & special) - {tokenizer.pad_token_id})


def resolve_trainable_tokens(setting: str | list[str], template: str, tokenizer: Any) -> list[int]:
    """Token ids for `trainable_tokens`: `none` → [], `auto` → the template's special tokens, a list →
    those tokens, each of which must be one token of the vocabulary."""
    if setting == "none":
        return []
    if setting == "auto":
        return template_special_tokens(template, tokenizer)
    vocabulary = tokenizer.get_vocab()
    unknown = [token for token in setting if token not in vocabulary]
    if unknown:
        raise ModelError(
            f"trainable_tokens: {unknown} are not tokens of this tokenizer (each entry must be one token, "
            "written as in its vocabulary, e.g. '<|im_end|>'); fix the list or use `auto`"
        )
    return sorted({vocabulary[token] for token in setting})
