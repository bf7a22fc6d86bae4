"""How close `sftkit plan`'s memory estimate is to a real training step's peak.

For each (model shape, fine-tuning, micro batch, sequence length, checkpointing, attention) of a
grid, one real step is run (the loop's forward `CausalLMLoss`, backward, AdamW step) after a warm-up step that
creates the optimizer state, and its peak is compared with the estimate.

Measured peak:
  CUDA  torch.cuda.max_memory_allocated() over the step (what tensors hold; the estimate is
        compared without its CUDA-context / fragmentation line, which the allocator does not count).
  CPU   torch keeps no allocator statistics on CPU, and a process's RSS high-water mark mixes in the
        Python heap and freed-but-kept pages, so `LiveStorage` below counts it: a dispatch mode sees
        every tensor any op creates (forward, backward, optimizer), adds its storage's bytes when
        first seen and subtracts them when the storage is freed, on top of what already lived
        before the step (parameters, optimizer state, the batch). Its peak is the largest sum of live
        storage bytes: the quantity max_memory_allocated measures on CUDA, less rounding to blocks.

QLoRA rows quantise the random model with bitsandbytes (NF4, double quantisation, bf16 compute) as
training does; a 4-bit weight lives as uint8 storage plus its quantisation constants, which are
tensors outside `parameters()` and counted alongside them.

    python bench/plan_accuracy.py            # the CPU grid (~2 minutes)
    python bench/plan_accuracy.py --quick    # four rows
    python bench/plan_accuracy.py --finetuning qlora lora   # only these rows
"""

from __future__ import annotations

import argparse
import tempfile
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import sftkit.model.attention  # noqa: F401  (registers attn_implementation = "varlen")
from sftkit.data.collate import cu_seqlens
from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.model.load import load_model
from sftkit.model.quantize import quantization_config
from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory
from sftkit.train.forward import CausalLMLoss
from sftkit.train.optim import build_optimizer

MIB = 2**20
SHAPES = {
    "llama-h256": LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
        tie_word_embeddings=False,
    ),
    "qwen2-h192": Qwen2Config(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class Case:
    shape: str
    finetuning: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    attn: str = "sdpa"
    chunked: bool = True
    bf16: bool = False  # bf16 weights under bf16 autocast, as `bf16: true` trains

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


class LiveStorage(TorchDispatchMode):
    """Peak bytes of live tensor storage over the ops run inside it (see the module docstring)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf)
        return out


def grid(quick: bool) -> list[Case]:
    cases = [Case(shape, ft, 2, 256, ckpt) for shape in SHAPES for ft in ("lora", "full") for ckpt in (False, True)]
    cases += [Case("llama-h256", ft, 1, 512, True) for ft in ("lora", "full")]
    cases += [
        Case("llama-h256", "lora", 2, 256, False, attn="eager"),
        Case("llama-h256", "full", 2, 256, False, chunked=False),
    ]
    cases += [Case("llama-h256", ft, 2, 256, ckpt, bf16=True) for ft in ("lora", "full") for ckpt in (False, True)]
    cases += [Case(shape, "qlora", 2, 256, ckpt) for shape in SHAPES for ckpt in (False, True)]
    return cases[:4] if quick else cases


def run_step(loss_model: CausalLMLoss, optimizer, batch: dict[str, torch.Tensor], case: Case) -> None:
    """One optimizer step through the training loop's own forward (mask per backend, sftkit's loss)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=case.bf16):
        loss = loss_model(**batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_model(case: Case, device: str) -> torch.nn.Module:
    """A random model of the case's shape; for QLoRA saved and loaded back through bitsandbytes,
    as training loads it."""
    config = SHAPES[case.shape]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=case.dtype, attn_implementation=case.attn)
    if case.finetuning == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = load_model(folder, case.dtype, case.attn, quantization_config=quantization_config())
    model.config.use_cache = False
    return model


def quantization_constants(model: torch.nn.Module) -> list[torch.Tensor]:
    """The absmax and code tensors of every 4-bit weight (they live in its quant_state, not in parameters())."""
    found = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            found += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = state.state2
    return found


def measure(case: Case, device: str) -> int:
    torch.manual_seed(0)
    config = SHAPES[case.shape]
    model = build_model(case, device)
    model = apply_adapters(model, AdapterOptions(finetuning=case.finetuning, gradient_checkpointing=case.checkpointing))
    model.train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    loss_model = CausalLMLoss(model, case.attn, case.chunked, 1024)
    input_ids = torch.randint(0, config.vocab_size, (case.micro_batch, case.seq_len), device=device)
    batch = {
        "input_ids": input_ids,
        "targets": torch.roll(input_ids, -1, dims=1),
        "position_ids": torch.arange(case.seq_len, device=device).expand_as(input_ids),
        "segment_ids": torch.ones_like(input_ids),  # one example per row: the mask is plain causal
        "cu_seqlens": cu_seqlens([[case.seq_len]] * case.micro_batch, case.seq_len).to(device),
    }
    run_step(loss_model, optimizer, batch, case)  # warm-up: creates the AdamW state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run_step(loss_model, optimizer, batch, case)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    existing = [*model.parameters(), *model.buffers(), *quantization_constants(model), *states, *batch.values()]
    with LiveStorage(existing) as tracker:
        run_step(loss_model, optimizer, batch, case)
    return tracker.peak


def estimate(case: Case) -> int:
    adapter = AdapterOptions(finetuning=case.finetuning)
    meta = MetaModel.build(SHAPES[case.shape], case.dtype, adapter, case.attn)
    inputs = MemoryInputs(
        gradient_checkpointing=case.checkpointing,
        autocast_dtype=torch.bfloat16 if case.bf16 else None,
        attn_implementation=case.attn,
        micro_batch=case.micro_batch,
        seq_len=case.seq_len,
        chunked_loss=case.chunked,
        loss_chunk_size=1024,
    )
    return estimate_memory(meta, inputs, cuda_overhead=False).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--finetuning", nargs="+", choices=["lora", "qlora", "full"], help="only these rows")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak of live tensor storage (LiveStorage)"
    print(
        f"device: {device}; measured: {method}; AdamW, sftkit loss (chunk 1024); "
        "bf16 = bf16 weights under bf16 autocast"
    )
    header = (
        f"{'shape':<11} {'ft':<5} {'dtype':<5} {'batch':>5} {'seq':>5} {'ckpt':<4} {'attn':<6} {'loss':<7} "
        f"{'estimate':>10} {'measured':>10} {'error':>7}"
    )
    print(header)
    print("-" * len(header))
    start, errors = time.perf_counter(), []
    for case in grid(args.quick):
        if args.finetuning and case.finetuning not in args.finetuning:
            continue
        estimated, measured = estimate(case), measure(case, device)
        error = (estimated - measured) / measured
        errors.append(abs(error))
        print(
            f"{case.shape:<11} {case.finetuning:<5} {'bf16' if case.bf16 else 'fp32':<5} "
            f"{case.micro_batch:>5} {case.seq_len:>5} "
            f"{'on' if case.checkpointing else 'off':<4} {case.attn:<6} {'chunked' if case.chunked else 'full':<7} "
            f"{estimated / MIB:>8.1f}Mi {measured / MIB:>8.1f}Mi {error:>+7.1%}",
            flush=True,
        )
    print(f"mean |error| {sum(errors) / len(errors):.1%}, max {max(errors):.1%}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
