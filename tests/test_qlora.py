"""QLoRA (NF4 base weights, double quantisation, bf16 compute, LoRA on every linear layer) runs the whole
way: on a tiny model and on SmolLM2-135M-Instruct, on CPU here and on CUDA with `pytest -m cuda`.

What a user relies on: the loss falls, a resumed run ends with the uninterrupted run's adapter, GA is
one big batch, and `sftkit merge` writes a full-precision model that plain transformers loads and that
answers like the base + adapter it was merged from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from packaging.version import Version
from peft import PeftModel
from transformers import AutoModelForCausalLM

import sftkit.train.loop as loop
import sftkit.train.step as step_module
from sftkit.data.collate import collate
from sftkit.merge import merge_adapter
from sftkit.model import quantize
from sftkit.model.adapters import AdapterOptions, apply_adapters, linear_module_names
from sftkit.model.load import ModelError, load_model, load_tokenizer
from sftkit.report import build_report
from sftkit.train.forward import CausalLMLoss
from tests.test_engine import assert_close_grads, gradients, make_examples
from tests.train_helpers import WORDS, final_weights, logged_losses, max_weight_difference, tiny_config, write_chat_data

_version = quantize.bitsandbytes_version()
needs_4bit = pytest.mark.skipif(
    _version is None or Version(_version) < Version(quantize.MIN_CPU_BITSANDBYTES),
    reason=f"bitsandbytes>={quantize.MIN_CPU_BITSANDBYTES} not installed",
)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

# Merged (full-precision base + folded adapter) against the 4-bit model + adapter it was trained as, on text
# like the training data: the base's NF4 rounding and bf16 compute are the difference. Stated bound on the
# mean KL divergence of next-token distributions, above what was measured (printed with -s): tiny 4.4e-5,
# SmolLM2 0.27, where the 4-bit base alone is at 0.49 from the fp32 base (these SmolLM2 weights are
# dequantised from a Q4_1 GGUF, which NF4 then rounds again).
MERGE_KL_BOUND = {"tiny": 1e-3, "smollm2": 0.5}
# The 4-bit layers compute in bf16, and micro 4 and micro 2 batches have different shapes (padded to 40
# tokens, against 40 and 23): on SmolLM2 GA matches one big batch within bf16 rounding (measured: loss
# 2.8e-5, gradients 2.0e-3 relative); on the tiny model to fp32 rounding (1.0e-7, 1.5e-7; on an AVX-512 CPU,
# where the two batch shapes take differently blocked fp32 kernels, loss 1.0e-7, gradient norm 4.8e-7 and up to
# 2.4e-6 per parameter, all in layer 0, the end of the longest backward chain: rounding, not a GA error, which
# would be of the order of the loss itself).
# bf16 keeps 8 bits: its rounding step is 2^-7 = 7.8e-3. The tiny model on CPU agrees to fp32 rounding; on CUDA
# the bf16-compute GEMMs reduce a micro-batch's tokens in a kernel chosen by its shape and round each partial
# gradient to bf16, so 2 micro-batches differ from 1 by bf16 rounding (measured on an H200: 1.4e-4, loss exact).
GA_TOLERANCE = {("tiny", "cpu"): 1e-5, ("tiny", "cuda"): 1e-2, ("smollm2", "cpu"): 1e-2, ("smollm2", "cuda"): 1e-2}

# merged against the same unquantised base + unmerged adapter, fp32 logits (measured 1.8e-7 tiny, 8.6e-5 SmolLM2)
FOLD_TOLERANCE = {"tiny": 1e-4, "smollm2": 5e-4}


@dataclass(frozen=True)
class Setting:
    """A run small enough for the suite: the tiny model trains 8 steps of 256 tokens, SmolLM2 4 of 64."""

    max_seq_length: int
    micro: int
    max_steps: int
    save_steps: int
    crash_at: int  # the step whose gradients raise, after checkpoint `save_steps`


# eval, samples and checkpoints all happen inside the run
RUN_EXTRAS = dict(
    eval_split_ratio=0.1, eval_steps=2, sample_prompts=["What is 12 plus 30?"], sample_steps=4, max_new_tokens=8
)
SETTINGS = {"tiny": Setting(256, 2, 8, 3, 5), "smollm2": Setting(64, 1, 4, 2, 3)}
MODELS = [
    pytest.param("tiny", id="tiny"),
    pytest.param("smollm2", id="smollm2", marks=pytest.mark.slow),
]  # trains: slow


def each_model_and_device(test):
    """Run `test(name, device)` on the tiny model and SmolLM2, on CPU and (marked `cuda`) on CUDA."""
    return needs_4bit(pytest.mark.parametrize("device", DEVICES)(pytest.mark.parametrize("name", MODELS)(test)))


def require(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CUDA is present, so runs use it: see the cuda variant")


def model_dir(request, name: str) -> Path:
    return request.getfixturevalue("tiny_model_dir" if name == "tiny" else "smollm2_dir")


def qlora_config(base: Path, name: str, data: Path, output_dir: Path, **overrides):
    setting = SETTINGS[name]
    return tiny_config(
        base,
        data,
        output_dir,
        finetuning="qlora",
        max_seq_length=setting.max_seq_length,
        per_device_train_batch_size=setting.micro,
        max_steps=setting.max_steps,
        save_steps=setting.save_steps,
        packing=True,
        **overrides,
    )


@pytest.fixture(scope="module")
def qlora_run(request, tmp_path_factory):
    """One uninterrupted QLoRA run per model and device, with packing, GA 2, LoRA dropout, eval and samples."""
    runs: dict[tuple[str, str], Path] = {}

    def run(name: str, device: str) -> Path:
        if (name, device) not in runs:
            folder = tmp_path_factory.mktemp(f"qlora-{name}-{device}")
            data = write_chat_data(folder / "chat.jsonl")
            loop.train(qlora_config(model_dir(request, name), name, data, folder / "run", **RUN_EXTRAS))
            runs[name, device] = folder / "run"
        return runs[name, device]

    return run


def test_qlora_without_the_needed_bitsandbytes_names_the_version(monkeypatch):
    monkeypatch.setattr(quantize, "bitsandbytes_version", lambda: "0.45.5")
    with pytest.raises(ModelError, match=r"bitsandbytes>=0\.47\.0 .*bitsandbytes 0\.45\.5 is installed"):
        quantize.check_qlora_supported(cuda=False)
    assert quantize.check_qlora_supported(cuda=True) is None  # CUDA 4-bit predates the CPU backend
    monkeypatch.setattr(quantize, "bitsandbytes_version", lambda: None)
    with pytest.raises(ModelError, match=r"needs bitsandbytes>=0\.47\.0"):
        quantize.check_qlora_supported(cuda=False)


@needs_4bit
@pytest.mark.parametrize("device", DEVICES)
def test_qlora_model_is_the_reference_recipe(tiny_model_dir, device):
    """Every linear layer but the head is NF4 with double quantisation and bf16 compute, and carries LoRA."""
    require(device)
    from bitsandbytes.nn import Linear4bit

    base = load_model(str(tiny_model_dir), torch.float32, quantization_config=quantize.quantization_config())
    linear = linear_module_names(base)
    model = apply_adapters(base, AdapterOptions(finetuning="qlora", r=4, alpha=8))
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * 2  # q k v o gate up down, 2 layers
    for module in quantized:
        state = module.weight.quant_state
        assert (state.quant_type, state.dtype, module.compute_dtype) == ("nf4", torch.float32, torch.bfloat16)
        assert state.nested  # double quantisation: the absmax are quantised too
        assert module.weight.dtype == torch.uint8  # two 4-bit weights per byte
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert adapted == set(linear)
    # prepare_model_for_kbit_training keeps what is not 4-bit in fp32 (norms, embeddings, head)
    assert {p.dtype for p in model.parameters() if p.dtype != torch.uint8} == {torch.float32}


@pytest.mark.slow
@each_model_and_device
def test_qlora_run_trains_and_reports(qlora_run, name, device):
    """The eval loss falls (the same held-out rows each time: a train step's loss depends on its batch);
    eval, samples, checkpoints, the adapter and the report are all there."""
    require(device)
    run = qlora_run(name, device)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    first, last = min(evals), max(evals)
    assert evals[last] < evals[first], evals
    assert (run / "samples.jsonl").read_text().strip()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert build_report(run).is_file()
    losses = logged_losses(run)
    print(
        f"\n{name}: eval loss {evals[first]:.4f} (step {first}) -> {evals[last]:.4f} (step {last}); "
        f"train loss by step {[round(losses[step], 4) for step in sorted(losses)]}"
    )


@pytest.mark.slow
@each_model_and_device
def test_qlora_resume_equals_the_uninterrupted_run(request, qlora_run, tmp_path, monkeypatch, name, device):
    """Crash mid-run, resume from the last checkpoint: the adapter ends where the uninterrupted run's did."""
    require(device)
    straight = qlora_run(name, device)
    setting = SETTINGS[name]
    data = straight.parent / "chat.jsonl"
    real, calls = step_module.accumulate_gradients, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == setting.crash_at:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "accumulate_gradients", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(qlora_config(model_dir(request, name), name, data, tmp_path / "run", **RUN_EXTRAS))
    monkeypatch.setattr(step_module, "accumulate_gradients", real)
    assert (tmp_path / "run" / f"checkpoint-{setting.save_steps}").is_dir()
    loop.train(
        qlora_config(model_dir(request, name), name, data, tmp_path / "run", resume_from_checkpoint=True, **RUN_EXTRAS)
    )
    difference = max_weight_difference(final_weights(straight), final_weights(tmp_path / "run"))
    print(f"\n{name}: resumed vs uninterrupted adapter, max |Δw| = {difference:.3g}")
    assert difference <= 1e-6, difference
    assert logged_losses(tmp_path / "run") == pytest.approx(logged_losses(straight), rel=1e-6, abs=0)


@each_model_and_device
def test_qlora_gradient_accumulation_is_one_big_batch(request, name, device):
    """micro 2 × GA 2 gives the loss and adapter gradients of micro 4 × GA 1 on the 4-bit model."""
    require(device)
    base_dir = model_dir(request, name)
    pad = load_tokenizer(str(base_dir)).pad_token_id
    accelerator = Accelerator(cpu=device == "cpu")
    lengths = [5, 40, 7, 23]
    results = []
    for micro in (4, 2):
        torch.manual_seed(0)
        base = load_model(str(base_dir), torch.float32, quantization_config=quantize.quantization_config())
        model = apply_adapters(base, AdapterOptions(finetuning="qlora", r=4, alpha=8, dropout=0.0))
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:  # non-zero B so that A's gradients are not all zero
                torch.nn.init.normal_(parameter, std=0.02)
        loss_model = CausalLMLoss(model, "sdpa", chunked=False, chunk_size=7).to(accelerator.device)
        examples = make_examples(min(model.config.vocab_size, 400), lengths)
        trained = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)
        batches = [
            {k: v.to(accelerator.device) for k, v in collate([[e] for e in examples[i : i + micro]], pad).items()}
            for i in range(0, len(examples), micro)
        ]
        loss_sum = step_module.accumulate_gradients(loss_model, accelerator, batches, trained)
        results.append((loss_sum[0].item() / trained, gradients(loss_model)))  # (loss sum, argmax hits)
    (big_loss, big_grads), (ga_loss, ga_grads) = results
    loss_error = abs(big_loss - ga_loss) / abs(big_loss)
    norm_error = (
        torch.cat([(big_grads[k] - ga_grads[k]).flatten() for k in big_grads]).norm()
        / torch.cat([g.flatten() for g in big_grads.values()]).norm()
    ).item()
    print(f"\n{name}: GA vs big batch, loss rel {loss_error:.3g}, gradient rel norm {norm_error:.3g}")
    tolerance = GA_TOLERANCE[name, device]
    assert loss_error <= tolerance and norm_error <= tolerance
    if tolerance < 1e-2:  # and every parameter's gradient on its own, where no bf16 rounding enters
        assert_close_grads(big_grads, ga_grads, rtol=tolerance)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ other) between next-token distributions; logits (batch, seq, vocab)."""
    log_p, log_q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@pytest.mark.slow
@each_model_and_device
def test_qlora_merge_writes_a_full_precision_model(qlora_run, tmp_path, name, device):
    """The merged model loads with plain transformers in fp32, equals the unquantised base + adapter, and is
    within the stated KL bound of the 4-bit model + adapter that was trained."""
    require(device)
    run = qlora_run(name, device)
    merged_dir = merge_adapter(run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == torch.float32
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if "Linear" in type(m).__name__)
    base_name = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    vocab = len(load_tokenizer(str(run / "adapter")))
    full = PeftModel.from_pretrained(load_model(base_name, torch.float32, vocab_size=vocab), str(run / "adapter"))
    four_bit_base = load_model(
        base_name, torch.float32, quantization_config=quantize.quantization_config(), vocab_size=vocab
    )
    quantize.keep_4bit_layers_trainable(four_bit_base)  # the kernels training ran with
    four_bit = PeftModel.from_pretrained(four_bit_base, str(run / "adapter"))
    text = " ".join(WORDS * 3)  # text like the training data, not random ids
    input_ids = load_tokenizer(str(run / "adapter"))(text, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        got = merged(input_ids=input_ids).logits  # (batch, seq, vocab)
        folded = full.eval()(input_ids=input_ids).logits
        trained = four_bit.eval()(input_ids=input_ids.to(four_bit.device)).logits.cpu()
        with four_bit.disable_adapter(), full.disable_adapter():  # the bases alone: what NF4 rounding does
            base_kl = mean_kl(
                four_bit(input_ids=input_ids.to(four_bit.device)).logits.cpu(), full(input_ids=input_ids).logits
            )
    fold_error = (got - folded).abs().max().item()
    kl = mean_kl(trained, got)
    agree = (trained.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(
        f"\n{name}: merged vs fp32 base + adapter max |Δlogit| {fold_error:.3g}; merged vs 4-bit + adapter "
        f"mean KL {kl:.3g}, top-1 agreement {agree:.1%}; 4-bit base vs fp32 base mean KL {base_kl:.3g}"
    )
    assert fold_error <= FOLD_TOLERANCE[name]
    assert kl <= MERGE_KL_BOUND[name]
    shutil.rmtree(merged_dir)
