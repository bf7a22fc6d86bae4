"""`sftkit plan`: byte counts equal to the tensors training creates, the schedule the loop follows,
and the command's output on tiny models (no GPU, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from sftkit.config import ConfigError, validate_config
from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.plan import build_plan
from sftkit.plan.gpus import GIB, Gpu, parse_gpu_memory, resolve_gpu
from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory
from sftkit.plan.schedule import ScheduleInputs, plan_schedule
from sftkit.plan.throughput import attention_span, flops_per_token

TINY = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 512,
}
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=64, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=True),  # q/k/v biases, tied head
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_parameter_gradient_and_adamw_bytes_equal_real_tensors(arch, finetuning, dtype):
    adapter = AdapterOptions(finetuning=finetuning, r=8)
    estimate = MetaModel.build(CONFIGS[arch](), dtype, adapter, "sdpa").params

    torch.manual_seed(0)
    model = apply_adapters(AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=dtype), adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    gradients = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    states = _bytes(t for state in optimizer.state.values() for t in state.values())

    parameters = list(model.parameters())
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert estimate.weights + estimate.adapters == _bytes(parameters)
    assert estimate.adapters == _bytes(adapters)
    assert estimate.gradients == gradients
    assert estimate.optimizer == states
    assert estimate.trainable_params == sum(p.numel() for p in parameters if p.requires_grad)
    assert estimate.base_params == sum(p.numel() for p in parameters) - sum(p.numel() for p in adapters)


LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_llama_31_8b_on_meta_has_its_known_parameter_count():
    meta = MetaModel.build(LlamaConfig(**LLAMA_31_8B), torch.bfloat16, AdapterOptions(finetuning="lora", r=16), "sdpa")
    assert meta.params.base_params == 8_030_261_248
    # all-linear LoRA r=16: 16 × (in + out) summed over q, k, v, o, gate, up, down, × 32 layers
    assert meta.params.trainable_params == 41_943_040
    assert meta.params.weights == 8_030_261_248 * 2  # bf16
    assert meta.params.adapters == 41_943_040 * 4  # peft keeps adapters in fp32


def test_qlora_stores_linear_weights_in_nf4_and_the_rest_in_fp32():
    meta = MetaModel.build(LlamaConfig(**LLAMA_31_8B), torch.bfloat16, AdapterOptions(finetuning="qlora"), "sdpa")
    by_dtype = meta.params.weights_by_dtype
    linear = 8_030_261_248 - 2 * 128256 * 4096 - (2 * 32 + 1) * 4096  # minus embeddings, head, norms
    assert linear / 2 < by_dtype["nf4"] < linear / 2 * 1.04  # 4 bits + ~3% absmax constants
    # prepare_model_for_kbit_training upcasts what is not 4-bit (embeddings, head, norms) to fp32
    assert by_dtype["float32"] == (8_030_261_248 - linear) * 4


def _inputs(**overrides) -> MemoryInputs:
    values = {
        "gradient_checkpointing": False,
        "autocast_dtype": None,
        "attn_implementation": "sdpa",
        "micro_batch": 2,
        "seq_len": 256,
        "chunked_loss": True,
        "loss_chunk_size": 64,
    }
    return MemoryInputs(**{**values, **overrides})


def test_activation_estimate_orders_like_the_settings_do():
    config = CONFIGS["llama"]()
    sdpa = MetaModel.build(config, torch.float32, AdapterOptions(finetuning="lora"), "sdpa")
    eager = MetaModel.build(config, torch.float32, AdapterOptions(finetuning="lora"), "eager")
    base = estimate_memory(sdpa, _inputs()).parts
    assert estimate_memory(sdpa, _inputs(gradient_checkpointing=True)).parts["activations"] < base["activations"]
    # eager keeps (batch, heads, seq, seq) probabilities; fused sdpa keeps a logsumexp per row
    assert estimate_memory(eager, _inputs()).parts["activations"] > base["activations"] + 2 * 4 * 256 * 256 * 4
    assert estimate_memory(sdpa, _inputs(micro_batch=4)).parts["activations"] == pytest.approx(
        2 * base["activations"], rel=0.01
    )
    assert estimate_memory(sdpa, _inputs(chunked_loss=False)).parts["loss or backward working set"] == 2 * 256 * TINY[
        "vocab_size"
    ] * (4 + 12)


def test_mask_free_kernels_hold_no_seq_squared_mask():
    """varlen and flash keep what fused sdpa keeps, less the seq² mask: the batch's bool mask and the
    float copy sdpa makes of it in every layer. Their activations grow linearly with the sequence."""
    config = CONFIGS["llama"]()
    adapter = AdapterOptions(finetuning="lora")
    sdpa = estimate_memory(MetaModel.build(config, torch.float32, adapter, "sdpa"), _inputs()).parts["activations"]
    layers, squares = TINY["num_hidden_layers"], 2 * 256 * 256
    for attn in ("varlen", "flash_attention_2"):
        meta = MetaModel.build(config, torch.float32, adapter, attn)
        at_256 = estimate_memory(meta, _inputs(attn_implementation=attn)).parts["activations"]
        at_512 = estimate_memory(meta, _inputs(attn_implementation=attn, seq_len=512)).parts["activations"]
        assert sdpa - at_256 >= squares * (1 + 4 * layers)
        assert at_512 == pytest.approx(2 * at_256, rel=1e-3)


def test_attention_flops_follow_the_examples_not_the_pack():
    config = CONFIGS["llama"]()
    lengths = [100] * 6 + [300, 4000]  # the 4000 is cut to max_seq_length
    assert attention_span(lengths, 2048, "varlen") == pytest.approx((6 * 100**2 + 300**2 + 2048**2) / (900 + 2048))
    assert attention_span(lengths, 2048, "sdpa") == attention_span(None, 2048, "varlen") == 2048
    short, long = (flops_per_token(config, 10**6, span, "full", False) for span in (100, 2048))
    # forward + 2 × forward backward, attention: 2 × layers × span × heads × head_dim per token
    assert long - short == pytest.approx(3 * 2 * TINY["num_hidden_layers"] * (2048 - 100) * TINY["hidden_size"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("80GiB", 80 * GIB),
        ("80GB", 80 * GIB),
        ("24G", 24 * GIB),
        ("24", 24 * GIB),
        ("40960MiB", 40 * GIB),
        ("7.5 GiB", int(7.5 * GIB)),
    ],
)
def test_gpu_memory_parsing(text, expected):
    assert parse_gpu_memory(text) == expected


def test_gpu_names_and_bad_sizes():
    assert resolve_gpu("h100", None).memory_bytes == 80 * GIB
    assert resolve_gpu("RTX 4090", None).memory_bytes == 24 * GIB
    assert resolve_gpu("A100-40GB", None).memory_bytes == 40 * GIB
    assert resolve_gpu(None, None) is None
    with pytest.raises(ConfigError, match="unknown GPU; known: RTX4090"):
        resolve_gpu("V100", None)
    with pytest.raises(ConfigError, match="not a size"):
        parse_gpu_memory("lots")
    with pytest.raises(ConfigError, match="both given"):
        resolve_gpu("H100", "80GiB")


def _schedule(**overrides) -> ScheduleInputs:
    values = {
        "micro_batch": 4,
        "gradient_accumulation": 4,
        "num_gpus": 2,
        "learning_rate": 2e-4,
        "finetuning": "lora",
        "scheduler": "cosine",
        "min_lr_ratio": 0.0,
        "warmup_ratio": 0.1,
        "warmup_steps": 0,
        "num_train_epochs": 3,
        "max_steps": -1,
    }
    return ScheduleInputs(**{**values, **overrides})


def test_schedule_counts_steps_like_the_loop():
    plan = plan_schedule(_schedule(), sequences=4001, examples=20_000)
    assert plan.effective_batch == 32
    assert plan.steps_per_epoch == 126  # ceil(ceil(4001 / 4) / (4 × 2)) micro-batches, as the loop counts
    assert plan.total_steps == 378 and plan.warmup_steps == 38  # ceil(0.1 × 378)
    assert len(plan.lr_points) == 11
    assert plan.lr_points[0]["step"] == 1 and plan.lr_points[-1]["step"] == 378
    assert plan.lr_points[0]["fraction_of_peak"] == pytest.approx(1 / 39)  # (step + 1) / (warmup + 1)
    assert plan.lr_points[-1]["lr"] < 1e-6
    assert plan.warnings == []
    overridden = plan_schedule(_schedule(max_steps=500), sequences=4001, examples=20_000)
    assert overridden.total_steps == 500 and overridden.epochs == pytest.approx(500 / 126)
    no_data = plan_schedule(_schedule(max_steps=200), sequences=None, examples=None)
    assert no_data.total_steps == 200 and no_data.steps_per_epoch is None and len(no_data.lr_points) == 11


def test_schedule_warnings():
    plan = plan_schedule(
        _schedule(micro_batch=1, gradient_accumulation=8, num_gpus=1, learning_rate=1e-3, num_train_epochs=5),
        sequences=100,
        examples=100,
    )
    text = "\n".join(plan.warnings)
    assert "effective batch 8 is outside the usual 16–128" in text
    assert "only 65 optimizer steps (fewer than ~100)" in text
    assert "learning_rate 0.001 is far from the usual 0.0001–0.0002 for lora" in text
    assert "5.0 epochs over 100 examples" in text
    full = plan_schedule(_schedule(finetuning="full", learning_rate=2e-4), sequences=1000, examples=20_000)
    assert any("for full" in warning for warning in full.warnings)


# --------------------------------------------------------------------------- the command


@pytest.fixture()
def plan_config(tmp_path: Path, tiny_model_dir: Path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")

    def make(**overrides):
        raw = {
            "model_name_or_path": str(tiny_model_dir),
            "chat_template": "chatml",
            "max_seq_length": 128,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "num_train_epochs": 2,
            "datasets": [
                {
                    "path": str(data),
                    "format": "prompt_completion",
                    "columns": {"prompt": "question", "completion": "answer"},
                }
            ],
        }
        return validate_config({**raw, **overrides})

    return make


def test_plan_command_prints_json_with_a_boolean_fits(plan_config, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from sftkit.cli import app

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(plan_config().model_dump(mode="json")), encoding="utf-8")
    result = CliRunner().invoke(app, ["plan", str(path), "--gpu-memory", "24GiB", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["fits"] is True
    assert plan["data"]["train_examples"] == 40
    sequences = plan["data"]["packed_sequences"]
    assert plan["schedule"]["steps_per_epoch"] == math.ceil(math.ceil(sequences / 2) / 2)  # micro 2, GA 2
    assert plan["memory"]["gpu_bytes"] == 24 * GIB
    assert plan["time"]["hours"] is None  # an unnamed GPU has no default throughput

    text = CliRunner().invoke(app, ["plan", str(path), "--gpu", "L4"])
    assert text.exit_code == 0, text.output
    for heading in ("Data", "Batch and schedule", "Learning rate", "Memory per GPU", "Estimated time", "Known GPUs"):
        assert heading in text.stdout
    bad = CliRunner().invoke(app, ["plan", str(path), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory = 'lots'" in bad.output


def test_plan_goes_on_without_data_using_max_steps(plan_config):
    config = plan_config(datasets=[{"path": "nobody/no-such-dataset"}], max_steps=150)
    plan = build_plan(config, Gpu("test", 24 * GIB))
    assert "data could not be read" in plan["data"]["error"]
    assert plan["schedule"]["total_steps"] == 150 and len(plan["schedule"]["lr_points"]) == 11
    assert plan["time"]["tokens"] == 150 * 4 * 128
    assert isinstance(plan["fits"], bool)


@pytest.mark.parametrize("mode", ["streaming", "mixture"])
def test_plan_of_a_stream_or_a_mixture_runs_max_steps(plan_config, mode):
    spec = plan_config().datasets[0].model_dump()
    extra = (
        {"streaming": True}
        if mode == "streaming"
        else {"datasets": [{**spec, "weight": 1}, {**spec, "label": "again", "weight": 2}]}
    )
    plan = build_plan(plan_config(max_steps=150, **extra), Gpu("test", 24 * GIB))
    assert plan["data"]["train_examples"] == (40 if mode == "streaming" else 80)  # a stream: its first rows
    assert plan["schedule"]["total_steps"] == 150 and plan["schedule"]["steps_per_epoch"] is None


def test_qlora_plans_on_a_machine_without_gpu(plan_config):
    plan = build_plan(plan_config(finetuning="qlora", bf16=True), Gpu("test", 24 * GIB))
    assert "nf4" in plan["memory"]["weights_by_dtype"]
    assert plan["model"]["finetuning"] == "qlora"


def test_a_run_that_does_not_fit_gets_changes_that_do(plan_config):
    config = plan_config(max_seq_length=512, per_device_train_batch_size=8)
    total = build_plan(config, Gpu("test", 80 * GIB))["memory"]["total_bytes"]
    plan = build_plan(config, Gpu("tight", total - 1))
    assert plan["fits"] is False
    changes = {change["change"]: change for change in plan["changes"]}
    checkpointing = changes["gradient_checkpointing: true"]
    assert checkpointing["fits"] and checkpointing["total_bytes"] < total
    assert changes["per_device_train_batch_size: 4, gradient_accumulation_steps: 4"]["total_bytes"] < total
    assert "FSDP across 2 GPUs" in changes
    assert changes["max_seq_length: 256"]["note"].startswith("truncates 0 of 40")


def test_probe_measures_this_machine_and_says_so(plan_config):
    plan = build_plan(plan_config(), Gpu("test", 24 * GIB), probe=True)
    source = plan["time"]["throughput_source"]
    assert source.startswith("measured on ")
    assert plan["time"]["tokens_per_second_per_gpu"] > 0 and plan["time"]["hours"] > 0
