"""NEFTune, torch_compile and activation offloading: each does what it says and nothing else."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import sftkit.train.loop as loop
import sftkit.train.offload as offload
from sftkit.data.collate import collate, cu_seqlens
from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.model.load import load_model, load_tokenizer
from sftkit.model.neftune import add_neftune_noise
from sftkit.monitor.samples import generate_samples
from sftkit.train.forward import CausalLMLoss
from tests.train_helpers import logged_losses, tiny_config, write_chat_data

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture()
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    return apply_adapters(load_model(str(tiny_model_dir), torch.float32), AdapterOptions(r=4, dropout=0.0))


def a_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = [
        [
            {
                "input_ids": tokenizer("What is 12 plus 30? The answer is 42.")["input_ids"],
                "labels": tokenizer("What is 12 plus 30? The answer is 42.")["input_ids"],
            }
        ],
        [
            {
                "input_ids": tokenizer("Hello! How can I help you today?")["input_ids"],
                "labels": tokenizer("Hello! How can I help you today?")["input_ids"],
            }
        ],
    ]
    return collate(rows, tokenizer.pad_token_id)


def test_neftune_noises_training_forward_only(lora_model, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    loss_model = CausalLMLoss(lora_model, "sdpa", chunked=True)
    batch = a_batch(tokenizer)
    prompts = [[{"role": "user", "content": "What is 12 plus 30?"}]]
    embeddings = lora_model.get_input_embeddings()
    ids = batch["input_ids"]
    with torch.no_grad():
        clean_embeddings = embeddings(ids)
        loss_model.eval()
        clean_eval = loss_model(**batch)
        loss_model.train()
        clean_train = loss_model(**batch)
    clean_samples = generate_samples(lora_model, tokenizer, TEMPLATE, prompts, max_new_tokens=12)

    add_neftune_noise(lora_model, alpha=5.0)
    with torch.no_grad():
        noisy = embeddings(ids) - clean_embeddings  # (batch, seq, hidden)
        bound = 5.0 / (ids.shape[1] * clean_embeddings.shape[2]) ** 0.5
        assert 0.5 * bound < noisy.abs().max() <= bound  # uniform noise at the NEFTune scale
        assert loss_model(**batch) != clean_train  # training forward is noised
        loss_model.eval()
        assert torch.equal(loss_model(**batch), clean_eval)  # eval loss untouched
        assert torch.equal(embeddings(ids), clean_embeddings)
    loss_model.train()
    assert generate_samples(lora_model, tokenizer, TEMPLATE, prompts, max_new_tokens=12) == clean_samples
    assert lora_model.training  # generate_samples restored train mode, and training noise is back on
    with torch.no_grad():
        assert not torch.equal(embeddings(ids), clean_embeddings)


@pytest.mark.slow
def test_neftune_run_trains_with_noise_and_evaluates_without(tmp_path, tiny_model_dir, monkeypatch):
    """Through the loop: step-1 loss (same weights) differs; eval at step 1 with no weight change equals."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=24)
    evals = {}

    def run(name, **extra):
        config = tiny_config(
            tiny_model_dir,
            data,
            tmp_path / name,
            max_steps=1,
            lora_dropout=0.0,
            eval_split_ratio=0.2,
            eval_steps=1,
            sample_prompts=["What is 12 plus 30?"],
            max_new_tokens=8,
            **extra,
        )
        monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # weights stay the base's
        loop.train(config)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evals[name] = next(r["eval_loss"] for r in rows if "eval_loss" in r)
        return logged_losses(tmp_path / name)[1], (tmp_path / name / "samples.jsonl").read_text()

    plain_loss, plain_samples = run("plain")
    noisy_loss, noisy_samples = run("neftune", neftune_noise_alpha=5.0)
    assert noisy_loss != plain_loss
    assert evals["neftune"] == evals["plain"]
    assert noisy_samples == plain_samples


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, tiny_model_dir):
    """10 steps with every decoder layer compiled (inductor) log the same losses as eager."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=24)
    settings = dict(max_steps=10, lora_dropout=0.0, save_steps=100, lora_target_modules=["q_proj", "v_proj"])
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "eager", **settings))
    torch._dynamo.reset()
    compiled_calls = []
    real = torch.nn.Module.compile
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.nn.Module,
            "compile",
            lambda self, **kw: (compiled_calls.append(type(self).__name__), real(self, **kw))[1],
        )
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "compiled", torch_compile=True, **settings))
    assert compiled_calls == ["LlamaDecoderLayer", "LlamaDecoderLayer"]
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 11))
    for step in range(1, 11):
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step


def test_activation_offloading_without_cuda_says_so_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(offload, "_told", False)
    told = []
    first = offload.activation_offloading(True, tell=told.append)
    second = offload.activation_offloading(True, tell=told.append)
    assert told == [offload.MESSAGE_WITHOUT_CUDA]
    assert "no effect on this machine" in told[0]
    with first, second:  # no-ops
        pass
    assert offload.activation_offloading(False, tell=told.append) is not None and len(told) == 1


@pytest.mark.cuda
def test_activation_offloading_gives_the_same_gradients_and_moves_activations(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = LlamaForCausalLM(config).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_model = CausalLMLoss(model, "sdpa", chunked=True)
    ids = torch.randint(0, 512, (4, 1024), device="cuda")
    batch = {
        "input_ids": ids,
        "targets": ids.roll(-1, 1),
        "position_ids": torch.arange(1024, device="cuda").repeat(4, 1),
        "segment_ids": torch.ones_like(ids),
        "cu_seqlens": cu_seqlens([[1024]] * 4, width=1024).cuda(),
    }

    def step(context):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with context:
            loss = loss_model(**batch)
        torch.cuda.synchronize()  # copies done; the next allocation lets their device blocks go
        torch.empty(1, device="cuda")
        kept = torch.cuda.memory_allocated() - before  # activations held for backward (+ the loss)
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept

    plain_loss, plain_grads, plain_kept = step(offload.activation_offloading(False))
    offloaded_loss, offloaded_grads, offloaded_kept = step(offload.activation_offloading(True))
    assert offloaded_loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad)  # attention backward may use atomics
    assert offloaded_kept < plain_kept / 2, (offloaded_kept, plain_kept)


def test_plan_moves_checkpointed_activations_to_the_host():
    from transformers import LlamaConfig

    from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    meta = MetaModel.build(config, torch.bfloat16, AdapterOptions(finetuning="lora"), "sdpa")
    inputs = MemoryInputs(
        gradient_checkpointing=True,
        autocast_dtype=None,
        attn_implementation="sdpa",
        micro_batch=4,
        seq_len=1024,
        chunked_loss=True,
        loss_chunk_size=256,
    )
    kept = estimate_memory(meta, inputs)
    offloaded = estimate_memory(meta, replace(inputs, activation_offloading=True))
    layer_input = 4 * 1024 * 256 * 2  # (batch, seq, hidden) in bf16
    assert kept.parts["activations"] >= 6 * layer_input and kept.host_activations == 0
    assert offloaded.parts["activations"] == layer_input  # only the layer in flight stays on the GPU
    assert offloaded.host_activations == kept.parts["activations"]
    assert offloaded.total < kept.total
