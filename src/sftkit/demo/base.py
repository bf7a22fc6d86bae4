"""The demo's own tiny base model, built here so the demo needs no download.

A small BPE tokenizer is trained on the task's text and saved as a real `PreTrainedTokenizerFast`
(bos, eos, unk, pad, and a ChatML-like chat template whose end-of-turn `<|im_end|>` is one token);
a small Llama is initialised at random and saved with `save_pretrained` (safetensors). Pre-training
on the task's raw text is then an ordinary `sftkit train` run (`format: text`, `finetuning: full`),
so the base model that fine-tuning loads comes through the same path as a hub model.

Numbers are split into their significant digits and their trailing zeros, so the demo's answers
are a copy of the question's number followed by a run of zeros, two tokens the model can learn
to produce in a minute of training:

    "How many grams are in 35 kilograms?\n35000 grams"
        How | Ġmany | Ġgrams | Ġare | Ġin | Ġ | 35 | Ġkilograms | ? | Ċ | 35 | 000 | Ġgrams
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# A number's significant digits (lazily, up to its trailing zeros), or a run of zeros.
NUMBER_PARTS = r"[1-9][0-9]*?(?=0*(?![0-9]))|0+"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")

# ChatML without the newline after <|im_end|>: the end of a turn is exactly one token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ModelSize:
    """A Llama small enough to train in a minute or two on two CPU cores."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 512


def build_tokenizer(corpus: list[str], path: Path, vocab_size: int = 640) -> Path:
    """Train a byte-level BPE on `corpus` and save it, with its chat template, as a Hugging Face tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(NUMBER_PARTS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def build_model(vocab_size: int, path: Path, size: ModelSize, seed: int = 0) -> tuple[Path, int]:
    """A randomly initialised Llama saved like a hub checkpoint; returns (path, parameter count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())
