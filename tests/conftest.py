"""Shared fixtures: the real Llama-2 tokenizer when ../shared has it, a tiny tokenizer we build
otherwise, and tiny random Llama models saved like hub checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"
GSM8K = SHARED / "data" / "gsm8k"
SHAREGPT = SHARED / "data" / "sharegpt" / "conversations.json"
FIXTURES = Path(__file__).parent / "fixtures"


def requires(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")


@pytest.fixture(scope="session")
def llama2_tokenizer():
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip("../shared/tokenizers/llama2 not present")
    from sftkit.model.load import load_tokenizer

    return load_tokenizer(str(LLAMA2_TOKENIZER))


def build_tiny_tokenizer(path: Path) -> Path:
    """A small byte-level BPE tokenizer trained on a few sentences, saved as a real HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "What is 12 plus 30? The answer is 42.",
        "Hello! How can I help you today?",
        "User and assistant take turns in a conversation.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random Llama saved with save_pretrained (safetensors), loadable like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Tiny Llama + the tiny tokenizer in one folder (no network, no ../shared needed)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.save_pretrained(path)
    return build_tiny_llama(path, vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as a folder `generate` and `eval` load: weights, tokenizer and the ChatML template."""
    from sftkit.data.template import _builtin

    folder = tmp_path_factory.mktemp("tuned")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(_builtin("chatml"), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def other_base(tmp_path_factory, chat_model) -> Path:
    """Another tiny chat model (other weights, same tokenizer and template), to stand for a base."""
    import json

    folder = tmp_path_factory.mktemp("base")
    shutil.copytree(chat_model, folder, dirs_exist_ok=True)
    vocab = json.loads((chat_model / "config.json").read_text())["vocab_size"]
    return build_tiny_llama(folder, vocab_size=vocab, seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded the way runs load theirs (pad token set, right padding)."""
    from sftkit.model.load import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf_to_folder(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors folder (model + tokenizer).

    A model loaded from GGUF keeps the GGUF quantization in its config and cannot be saved as it is,
    so the model is rebuilt from its config without it. Written to a temporary folder, then renamed, so
    concurrent test runs never see half a folder.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain safetensors folder, converted once and cached.

    The cache is keyed by the GGUF file's size and mtime, outside the repository (~/.cache).
    """
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} not present")
    stat = SMOLLM2_GGUF.stat()
    cache = Path(os.environ.get("SFTKIT_TEST_CACHE", Path.home() / ".cache" / "sftkit-tests"))
    folder = convert_gguf_to_folder(SMOLLM2_GGUF, cache / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}")
    for stale in cache.glob("smollm2-135m-instruct-*"):  # conversions of an earlier copy of the file (~0.5 GB each)
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return folder
