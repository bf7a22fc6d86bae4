"""GGUF in, fine-tune, GGUF out, on the real SmolLM2-135M-Instruct (skipped where ../shared lacks it).

A short LoRA run with `trainable_tokens: auto` (so <|im_start|>/<|im_end|> rows train too) through the
Python API, exported to f16 and q8_0, read back by transformers' GGUF reader and compared with the
merged model; then, where llama-cpp-python is installed, llama.cpp itself answers 5 prompts through the
chat template stored in the file, greedily, and must give transformers' tokens and stop at <|im_end|>.
Bounds, over every position of the 5 prompts (186 positions; measured: f16 max |Δlogit| 0.072, q8_0
mean KL 4.1e-3 and top-1 1.0; every quantisation in bench/export_gguf.py): f16 max |Δlogit| < 0.25 (f16
keeps 11 bits of each weight); q8_0 mean KL < 0.02 and top-1 agreement > 0.95.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import sftkit
from tests.export_helpers import PROMPTS, chat_inputs, compare, train_chat_run


@pytest.fixture(scope="module")
def trained_run(smollm2_dir, tmp_path_factory) -> Path:
    return train_chat_run(smollm2_dir, tmp_path_factory.mktemp("smollm2_run"))


@pytest.fixture(scope="module")
def merged(trained_run):
    import torch

    from sftkit.merge import load_merged

    model, tokenizer, template, was_adapter = load_merged(trained_run / "adapter", torch.float32)
    assert was_adapter
    return model, tokenizer, template


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """`exported(quant)`: the run exported once per quantisation in this module."""
    made: dict = {}

    def get(quant: str):
        if quant not in made:
            made[quant] = sftkit.export(trained_run, tmp_path_factory.mktemp(quant), quant=quant)
        return made[quant]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_round_trip_through_transformers_gguf_reader(merged, exported, quant):
    from transformers import AutoModelForCausalLM

    model, tokenizer, template = merged
    result = exported(quant)
    reloaded = AutoModelForCausalLM.from_pretrained(result.path.parent, gguf_file=result.path.name)
    figures = compare(model, reloaded, chat_inputs(tokenizer, template, PROMPTS))
    print(f"{quant}: {result.path.stat().st_size / 2**20:.1f} MiB, {figures}")
    if quant == "f16":
        assert figures["max_abs_logit"] < 0.25
    else:
        assert figures["mean_kl"] < 0.02 and figures["top1"] > 0.95
    # the trained rows of the chat tokens made it into the file
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gap = (reloaded.get_input_embeddings().weight[im_end] - model.get_input_embeddings().weight[im_end]).abs().max()
    assert gap < (1e-3 if quant == "f16" else 2e-2)


@pytest.mark.slow
def test_llama_cpp_greedy_matches_transformers_and_stops_at_end_of_turn(merged, exported):
    Llama = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed").Llama

    from sftkit.monitor.samples import generate_samples

    model, tokenizer, template = merged
    result = exported("f16")
    expected = generate_samples(model, tokenizer, template, [[{"role": "user", "content": p}] for p in PROMPTS], 48)
    llm = Llama(str(result.path), n_ctx=512, chat_format=None, verbose=False, seed=0)  # the GGUF's own template
    same = total = 0
    for prompt, sample in zip(PROMPTS, expected, strict=True):
        answer = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=48)
        choice = answer["choices"][0]
        assert sample["ended"], f"transformers did not stop on {prompt!r}"
        assert choice["finish_reason"] == "stop", f"llama.cpp did not stop at <|im_end|> on {prompt!r}"
        want = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
        got = tokenizer(choice["message"]["content"], add_special_tokens=False)["input_ids"]
        common = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        same, total = same + common, total + max(len(want), len(got))  # identical up to the first difference
    print(f"llama.cpp f16 greedy: {same}/{total} tokens identical to transformers")
    assert same == total
