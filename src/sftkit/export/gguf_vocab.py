"""The tokenizer, its special tokens and the run's chat template as GGUF `tokenizer.*` keys.

llama.cpp and Ollama tokenize with what these keys say and stop at the end-of-generation tokens they
name, so a model served from the file renders and ends turns as training did:

    tokenizer.ggml.model       gpt2 (byte-level BPE: Llama 3, SmolLM2, Qwen) | llama (BPE with byte
                               fallback, sentencepiece style: Llama 2, Mistral)
    tokenizer.ggml.pre         how text is split before BPE (llama-bpe, qwen2, smollm, gpt-2, ...)
    tokenizer.ggml.tokens / token_type / scores / merges
    tokenizer.ggml.bos/eos/unknown/padding_token_id, eot_token_id (the template's end-of-turn)
    tokenizer.chat_template    the template the run trained with

Token types follow llama.cpp: special added tokens are CONTROL (parsed as one token in rendered
prompts), other added tokens USER_DEFINED, `<0x..>` pieces BYTE, rows past the tokenizer UNUSED.
The pre-tokenizer name is found by matching the tokenizer's split regex against the table of
transformers' GGUF reader, the reader this file is checked against. Cost: O(vocabulary).
"""

from __future__ import annotations

import json
from typing import Any

from sftkit.data.template import end_of_turn
from sftkit.model.load import ModelError

# Names llama.cpp knows, first choice first where several share one regex in transformers' table.
PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def backend_json(tokenizer: Any) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def tokenizer_model(spec: dict) -> str:
    """`gpt2` or `llama`, or a ModelError naming a tokenizer llama.cpp's two BPE kinds do not cover."""
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2"
    raise ModelError(
        f"tokenizer: a {model.get('type')} model (byte_fallback={model.get('byte_fallback')}) is not exported to "
        "GGUF; supported: byte-level BPE (Llama 3, SmolLM2, Qwen) and BPE with byte fallback (Llama 2, Mistral)"
    )


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer `spec` describes."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after one digit per piece
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        names = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        for name in (*PREFERRED_PRE, *names):
            if name in names:
                return name
    raise ModelError(
        f"tokenizer: its pre-tokenizer ({' + '.join(str(kind) for kind in kinds)}) matches none llama.cpp "
        "knows, so llama.cpp would split text differently from training; convert with llama.cpp's "
        "convert_hf_to_gguf.py, which hashes the tokenizer to name it"
    )


def token_types(tokenizer: Any, tokens: list[str | None], kind: str) -> list[Any]:
    import gguf

    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    types = []
    for index, token in enumerate(tokens):
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif index == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def end_of_turn_id(template: str, tokenizer: Any) -> int | None:
    """The token the template writes after each reply, None for templates that end with nothing; a
    ModelError where that text is not one token (llama.cpp and Ollama stop at a token, never at text)."""
    text = end_of_turn(template, tokenizer).strip()
    if not text:
        return None
    token_id = tokenizer.get_vocab().get(text)
    if token_id is None:
        raise ModelError(
            f"the chat template ends each turn with {text!r}, which is not a token of the tokenizer's "
            "vocabulary, so llama.cpp and Ollama could not stop there; add it as a special token "
            f"(tokenizer.add_special_tokens) and train its rows (trainable_tokens: ['{text}']), or train with a "
            "template whose turns end with the EOS token"
        )
    return token_id


def add_tokenizer(writer: Any, tokenizer: Any, template: str, vocab_size: int) -> None:
    """All `tokenizer.*` keys for a model whose embedding has `vocab_size` rows (≥ the tokenizer's length)."""
    import gguf

    spec = backend_json(tokenizer)
    kind = tokenizer_model(spec)
    backend = tokenizer.backend_tokenizer
    if len(tokenizer) > vocab_size:
        raise ModelError(
            f"tokenizer: {len(tokenizer)} tokens but the model has {vocab_size} embedding rows; resize the "
            "embedding (model.resize_token_embeddings) before exporting"
        )
    tokens = [backend.id_to_token(index) for index in range(vocab_size)]
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre_tokenizer_name(spec) if kind == "gpt2" else "default")
    writer.add_token_list([token if token is not None else f"[PAD{index}]" for index, token in enumerate(tokens)])
    types = token_types(tokenizer, tokens, kind)
    writer.add_token_types(types)
    if kind == "llama":
        # sentencepiece merges the highest-scoring pair first; a BPE vocabulary is in merge order
        normal = gguf.TokenType.NORMAL
        writer.add_token_scores([-float(index) if type_ == normal else 0.0 for index, type_ in enumerate(types)])
        metaspace = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("normalizer"))
        writer.add_add_space_prefix('"prepend_scheme": "first"' in metaspace or '"Prepend"' in metaspace)
    merges = spec["model"].get("merges", [])
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair for pair in merges])
    for key, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
        ("eot", end_of_turn_id(template, tokenizer)),
    ):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_chat_template(template)
