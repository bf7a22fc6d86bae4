"""LoRA variants (DoRA, rsLoRA, modules_to_save, PiSSA/OLoRA init): each resumes exactly and merges into
the original base so that merged == base + adapter == the model as trained."""

from __future__ import annotations

import json

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sftkit.train.loop as loop
from sftkit.config import ConfigError
from sftkit.generate import load_trained
from sftkit.merge import merge_adapter
from sftkit.model.adapters import AdapterOptions, LoraVariant, apply_adapters
from sftkit.model.load import ModelError, load_model
from tests.train_helpers import (
    crash_in_step,
    final_weights,
    logged_losses,
    max_weight_difference,
    tiny_config,
    write_chat_data,
)

# Two runs cover every option; PiSSA, whose saved adapter is rewritten, meets the others too. OLoRA takes
# PiSSA's path (same conversion); add {"init_lora_weights": "olora"} here to run it as well.
VARIANTS = {
    "dora_modules_to_save": {"use_dora": True, "lora_modules_to_save": ["lm_head"]},
    "pissa_rslora_modules_to_save": {
        "init_lora_weights": "pissa",
        "use_rslora": True,
        "lora_modules_to_save": ["lm_head"],
    },
}


def trained_model(model_dir, checkpoint, config) -> torch.nn.Module:
    """The model exactly as training left it: the variant built on the original base again (PiSSA/OLoRA
    subtract the same init from the base), then the checkpoint's raw adapter weights loaded."""
    base = load_model(str(model_dir), torch.float32)
    torch.manual_seed(0)
    variant = LoraVariant(
        config.use_dora, config.use_rslora, tuple(config.lora_modules_to_save or ()), config.init_lora_weights
    )
    model = apply_adapters(
        base, AdapterOptions("lora", config.lora_r, config.lora_alpha, 0.0, "all-linear", variant=variant)
    )
    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_resumes_exactly_and_merges_into_the_original_base(name, tmp_path, tiny_model_dir, monkeypatch):
    data = write_chat_data(tmp_path / "chat.jsonl")
    settings = VARIANTS[name]
    straight = tiny_config(tiny_model_dir, data, tmp_path / "straight", **settings)
    loop.train(straight)
    with crash_in_step(monkeypatch, 5), pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", **settings))
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", resume_from_checkpoint=True, **settings))
    difference = max_weight_difference(final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed"))
    assert difference <= 1e-6, difference
    expected, got = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "crashed")
    assert [got[s] for s in range(1, 9)] == pytest.approx([expected[s] for s in range(1, 9)], rel=1e-6, abs=0)

    merged_dir = merge_adapter(tmp_path / "straight", tmp_path / "merged")
    adapter_config = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["init_lora_weights"] is True  # a plain adapter of the original base, whatever the init
    assert adapter_config["r"] == (8 if straight.init_lora_weights in ("pissa", "olora") else 4)  # [B | −B0]
    input_ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        as_trained = trained_model(tiny_model_dir, tmp_path / "straight" / "checkpoint-8", straight)(input_ids).logits
        on_base = load_trained(tmp_path / "straight" / "adapter")[0](input_ids).logits  # original base + adapter
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids).logits
    torch.testing.assert_close(on_base, as_trained, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged, as_trained, atol=1e-4, rtol=0)
    assert (merged - base).abs().max() > 1e-3  # training changed the model


def test_bad_variant_settings_are_refused_with_the_key(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    with pytest.raises(ConfigError, match="init_lora_weights = 'eva' is not supported"):
        tiny_config(tiny_model_dir, data, tmp_path / "out", init_lora_weights="eva")
    with pytest.raises(ConfigError, match="use_dora only apply to LoRA"):
        tiny_config(tiny_model_dir, data, tmp_path / "out", finetuning="full", use_dora=True)
    with pytest.raises(ConfigError, match="with use_dora"):
        tiny_config(tiny_model_dir, data, tmp_path / "out", init_lora_weights="pissa_niter_4", use_dora=True)
    base = load_model(str(tiny_model_dir), torch.float32)
    with pytest.raises(ModelError, match=r"lora_modules_to_save: \['lm_haed'\] are not modules"):
        apply_adapters(base, AdapterOptions(variant=LoraVariant(modules_to_save=("lm_haed",))))
