"""A real pretrained model end to end: SmolLM2-135M-Instruct from ../shared (skipped where absent).

Most tests use the `smollm2_dir` fixture (the GGUF converted once to a plain folder); one goes through
`gguf_file` on the GGUF file itself, the way a user fine-tunes a GGUF checkpoint.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftkit.data.template import IGNORE_INDEX, resolve_chat_template, tokenize_conversation
from sftkit.generate import generate_cli, load_trained
from sftkit.merge import merge_adapter
from sftkit.model.load import load_model, load_tokenizer
from sftkit.train.loop import train
from tests.conftest import GSM8K, SMOLLM2_GGUF, requires
from tests.train_helpers import tiny_config


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The token ids of each maximal run of trained positions."""
    runs: list[list[int]] = []
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE_INDEX:
            continue
        if position == 0 or labels[position - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(token)
    return runs


def test_gguf_file_errors_name_the_key_and_the_fix(tmp_path, monkeypatch, tiny_model_dir):
    from sftkit.config import ConfigError
    from sftkit.model.load import ModelError
    from tests.train_helpers import tiny_config

    with pytest.raises(ModelError, match=r"gguf_file = 'missing.gguf': no such file in .*; set gguf_file"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="a GGUF base is dequantized and cannot be quantized again"):
        tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", gguf_file="m.gguf", finetuning="qlora")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ModelError, match=r"needs the `gguf` package; pip install 'sftkit\[gguf\]'"):
        load_model(str(tmp_path / "m.gguf"), torch.float32)


def test_pad_is_not_eos_after_loading(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"  # its unk: no new row in the embedding


def test_masking_on_its_own_chatml_template(smollm2_dir):
    """Its template adds a default system prompt: nothing of it, nor of the user turns, is trained."""
    tokenizer = load_tokenizer(str(smollm2_dir))
    template = resolve_chat_template(None, tokenizer)
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."},
    ]
    example = tokenize_conversation(messages, template, tokenizer)
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    runs = [tokenizer.decode(run) for run in trained_runs(example["input_ids"], example["labels"])]
    assert runs == ["It is 4.<|im_end|>", "Six.<|im_end|>"]


def write_gsm8k(path: Path, start: int, rows: int, max_chars: int = 300) -> Path:
    """The first `rows` GSM8K training rows from row `start` whose question and answer are short
    (under `max_chars`), read line by line: whole answers, `#### N` and end-of-turn included."""
    with (GSM8K / "train.jsonl").open() as source, path.open("w") as target:
        short = (line for line in islice(source, start, None) if sum(map(len, json.loads(line).values())) < max_chars)
        target.writelines(islice(short, rows))
    return path


QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


@pytest.fixture(scope="module")
def gsm8k_run(smollm2_dir, tmp_path_factory):
    """A short LoRA run of the real loop, with the model's own template (default system prompt), on
    8 short GSM8K rows, eval on 8 others. Small on purpose: a 135M model on a shared 2-core CPU."""
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} not present")
    folder = tmp_path_factory.mktemp("gsm8k_run")
    gsm8k = {"format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}}
    config = tiny_config(
        smollm2_dir,
        write_gsm8k(folder / "train.jsonl", 0, 8),
        folder / "run",
        chat_template=None,
        datasets=[{"path": str(folder / "train.jsonl"), **gsm8k}],
        eval_dataset={"path": str(write_gsm8k(folder / "eval.jsonl", 1000, 8)), **gsm8k},
        max_seq_length=192,
        truncation="error",
        packing=False,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        learning_rate=3e-4,
        warmup_steps=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        per_device_eval_batch_size=8,
        max_steps=4,
        eval_steps=4,
        save_steps=100,
        sample_prompts=[QUESTION],
        max_new_tokens=64,
    )
    result = train(config)
    assert result.status == "finished"
    return result.output_dir


@pytest.fixture(scope="module")
def adapted(gsm8k_run):
    model, tokenizer, _ = load_trained(gsm8k_run / "adapter")
    return model, tokenizer


def eval_loss(model, dataset) -> float:
    """Mean loss over the trained tokens of every example, one example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            input_ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=input_ids).logits[:, :-1]  # (1, seq - 1, vocab)
            targets = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.slow
def test_lora_run_lowers_eval_loss(gsm8k_run, adapted):
    """The loop's logged eval loss is the adapter's loss on the eval rows, and lower than the base's."""
    from sftkit.config import load_config
    from sftkit.data.dataset import DataOptions, prepare_data

    model, tokenizer = adapted
    config = load_config(gsm8k_run / "config.yaml")
    template = (gsm8k_run / "chat_template.jinja").read_text()
    eval_set = prepare_data(DataOptions.from_config(config, template), tokenizer).eval.dataset
    trained = eval_loss(model, eval_set)
    with model.disable_adapter():
        base = eval_loss(model, eval_set)
    logged = [
        json.loads(line)["eval_loss"]
        for line in (gsm8k_run / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    print(
        f"eval loss: base {base:.4f} -> after {len(logged) and config.max_steps} steps {trained:.4f} "
        f"(logged {logged[-1]:.4f})"
    )
    assert logged[-1] == pytest.approx(trained, rel=1e-4)
    assert trained < base


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(gsm8k_run, adapted, smollm2_dir, tmp_path_factory):
    """`merge` writes a folder that plain transformers loads, with the logits of base + adapter."""
    model, tokenizer = adapted
    merged_dir = merge_adapter(gsm8k_run, tmp_path_factory.mktemp("merged") / "out")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    input_ids = tokenizer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits  # (1, seq, vocab)
        got = merged(input_ids=input_ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
    print(
        f"merged vs base + adapter: max |Δlogit| = {(got - expected).abs().max():.2e}; "
        f"vs base: {(got - base_logits).abs().max():.2e}"
    )
    # 30 fp32 layers, logits up to ~10: merged and unmerged sums round differently (seen: 1.0e-4 at most)
    torch.testing.assert_close(got, expected, atol=3e-4, rtol=0)
    assert (got - base_logits).abs().max() > 1e-2  # the adapter changed something
    assert generate_cli(merged_dir, [QUESTION], None, max_new_tokens=4)  # `sftkit generate` takes the folder


def test_generation_stops_at_im_end(smollm2_dir):
    """`sftkit generate` on the real model stops at its end-of-turn `<|im_end|>` (pad is not EOS)."""
    samples = generate_cli(smollm2_dir, ["What is the capital of France?"], None, max_new_tokens=32)
    print(f"generated: {samples[0]}")
    assert samples[0]["ended"], samples  # stopped at <|im_end|>, before max_new_tokens
    assert samples[0]["completion"] == "The capital of France is Paris."


@requires(SMOLLM2_GGUF)
@pytest.mark.slow
def test_gguf_base_trains_saves_and_merges(smollm2_dir, tmp_path):
    """`gguf_file`: the GGUF weights dequantize to exactly the converted folder's, the tokenizer comes from
    the file with pad != EOS, and the adapter names the GGUF as its base so `merge` reloads it."""
    source = str(SMOLLM2_GGUF)
    tokenizer = load_tokenizer(source)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.eos_token == "<|im_end|>"
    model = load_model(source, torch.float32, vocab_size=len(tokenizer))
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    reference = plain.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "chat_template.jinja").write_text(resolve_chat_template(None, tokenizer))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == source

    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    input_ids = torch.tensor([[1, 9690, 198, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=input_ids).logits, adapted.eval()(input_ids=input_ids).logits, atol=1e-4, rtol=0
        )
