"""Write a random-init Llama with the Llama-2 tokenizer to a folder, loadable like a hub model.

python bench/make_tiny_llama.py runs/tiny-llama --layers 4 --hidden 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2"


def make_tiny_llama(
    out: Path, layers: int = 4, hidden: int = 256, tokenizer: Path = SHARED_TOKENIZER, seed: int = 0
) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER)
    args = parser.parse_args()
    print(make_tiny_llama(args.out, args.layers, args.hidden, args.tokenizer))
