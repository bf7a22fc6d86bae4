"""Merged model == base + adapter, and `sftkit generate` gives the same replies from a run directory, its
adapter folder and the merged model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.config import ConfigError
from sftkit.data.template import resolve_chat_template
from sftkit.generate import generate_cli, load_trained
from sftkit.merge import merge_adapter
from sftkit.model.adapters import linear_module_names
from sftkit.model.load import ModelError, load_model, load_tokenizer

PROMPTS = ["What is 12 plus 30?", "Hello! How can I help you today?"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run directory whose final output is a LoRA adapter with random (non-zero) B matrices, saved
    with the tokenizer and chat template as the training loop saves it."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_model(str(tiny_model_dir), torch.float32, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=linear_module_names(base), task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "adapter" / "chat_template.jinja").write_text(resolve_chat_template("chatml", tokenizer))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return run


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory):
    return merge_adapter(run_dir, tmp_path_factory.mktemp("merged") / "out", max_shard_size="200KB")


def test_merged_logits_equal_base_plus_adapter(run_dir, merged_dir, tiny_model_dir):
    adapted, tokenizer, _ = load_trained(run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(input_ids=input_ids).logits  # (batch, seq, vocab)
        got = merged.eval()(input_ids=input_ids).logits
        base_logits = base.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - base_logits).abs().max() > 1e-2  # the adapter changed something


def test_merged_folder_is_standalone_and_sharded(run_dir, merged_dir):
    files = {path.name for path in merged_dir.iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert not any(name.startswith("adapter") or name.endswith(".bin") for name in files)
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert (merged_dir / "chat_template.jinja").read_text() == (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert json.loads((merged_dir / "config.json").read_text())["use_cache"] is True


def test_generate_from_run_adapter_and_merged_model_agree(run_dir, merged_dir, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    console = Console(record=True, width=120)
    from_run = generate_cli(run_dir, PROMPTS[:1], prompts_file, max_new_tokens=8, console=console)
    from_adapter = generate_cli(run_dir / "adapter", PROMPTS[:1], prompts_file, max_new_tokens=8)
    from_merged = generate_cli(merged_dir, PROMPTS[:1], prompts_file, max_new_tokens=8)
    assert [s["prompt"] for s in from_run] == PROMPTS
    assert from_run == from_adapter == from_merged
    printed = console.export_text()
    assert PROMPTS[1] in printed and from_run[0]["completion"][:20] in printed


def test_missing_tokenizer_or_template_is_a_clear_error(run_dir, tmp_path):
    no_template = tmp_path / "no_template"
    shutil.copytree(run_dir / "adapter", no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match=r"has no chat_template\.jinja"):
        load_trained(no_template)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"):
        shutil.copy(run_dir / "adapter" / name, no_tokenizer / name)
    with pytest.raises(ModelError, match="has no tokenizer"):
        load_trained(no_tokenizer)


def test_merge_and_generate_refuse_what_they_cannot_do(run_dir, merged_dir, tmp_path):
    with pytest.raises(ModelError, match="is not a LoRA adapter"):
        merge_adapter(merged_dir, tmp_path / "again")
    with pytest.raises(ModelError, match="already holds files"):
        merge_adapter(run_dir, merged_dir)
    with pytest.raises(ConfigError, match="nothing to generate"):
        generate_cli(run_dir, [], None)
    with pytest.raises(FileNotFoundError, match="--prompts-file"):
        generate_cli(run_dir, [], tmp_path / "missing.jsonl")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    with pytest.raises(ModelError, match="no final weights"):
        generate_cli(unfinished, PROMPTS, None)


def test_cli_generate_and_merge(run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "assistant:" in result.output
    result = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "merged model written to" in result.output and (tmp_path / "merged" / "config.json").is_file()
    result = runner.invoke(app, ["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such folder" in result.output
