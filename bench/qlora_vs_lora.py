"""QLoRA against LoRA on the same real model: peak memory, step time, and what `sftkit plan` said.

One training step (the loop's forward `CausalLMLoss`, backward, AdamW) on one micro-batch, for each
method, after a warm-up step that creates the optimizer state:
  memory  peak of live tensor storage over the step (`LiveStorage` of plan_accuracy.py, the quantity
          max_memory_allocated gives on CUDA); 4-bit weights count as their uint8 storage plus their
          quantisation constants. Beside it, the plan's estimate for the same step.
  time    wall and CPU time (process_time) of the step without the tracking mode; the two methods
          alternate, round after round, so that load from other processes falls on both alike, and the
          ratios are reported. One torch thread by default: on a shared machine waiting OpenMP threads
          spin, and CPU seconds per step are what other load moves least.

    python bench/qlora_vs_lora.py --model PATH_TO_HF_FOLDER     # e.g. SmolLM2-135M-Instruct
    python bench/qlora_vs_lora.py --model PATH --seq 256 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from plan_accuracy import LiveStorage, quantization_constants, run_step
from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.model.load import load_model, load_model_config
from sftkit.model.quantize import quantization_config
from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory
from sftkit.train.forward import CausalLMLoss
from sftkit.train.optim import build_optimizer

MIB = 2**20
CACHED_SMOLLM2 = Path.home() / ".cache" / "sftkit-tests"  # where tests/conftest.py converts ../shared's GGUF


class Step:
    """One method's model, optimizer and batch, ready to run steps."""

    def __init__(self, model_path: str, finetuning: str, micro: int, seq: int):
        torch.manual_seed(0)
        quantized = quantization_config() if finetuning == "qlora" else None
        model = load_model(model_path, torch.float32, quantization_config=quantized)
        self.model = apply_adapters(model, AdapterOptions(finetuning=finetuning, r=16, alpha=32, dropout=0.0))
        self.model.train()
        self.optimizer = build_optimizer(self.model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        self.loss_model = CausalLMLoss(self.model, "sdpa", True, 1024)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        input_ids = torch.randint(0, vocab, (micro, seq))
        self.batch = {
            "input_ids": input_ids,
            "targets": torch.roll(input_ids, -1, dims=1),
            "position_ids": torch.arange(seq).expand_as(input_ids),
            "segment_ids": torch.ones_like(input_ids),
        }
        self.case = argparse.Namespace(bf16=False)
        self.run()  # warm-up: creates the AdamW state

    def run(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one step."""
        wall, cpu = time.perf_counter(), time.process_time()
        run_step(self.loss_model, self.optimizer, self.batch, self.case)
        return time.perf_counter() - wall, time.process_time() - cpu

    def peak_bytes(self) -> int:
        states = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        existing = [
            *self.model.parameters(),
            *self.model.buffers(),
            *quantization_constants(self.model),
            *states,
            *self.batch.values(),
        ]
        with LiveStorage(existing) as tracker:
            run_step(self.loss_model, self.optimizer, self.batch, self.case)
        return tracker.peak

    def weight_bytes(self) -> int:
        tensors = [*self.model.parameters(), *quantization_constants(self.model)]
        return sum(t.numel() * t.element_size() for t in tensors if not t.requires_grad)


def plan_estimate(model_path: str, finetuning: str, micro: int, seq: int) -> int:
    meta = MetaModel.build(
        load_model_config(model_path), torch.float32, AdapterOptions(finetuning=finetuning, r=16), "sdpa"
    )
    inputs = MemoryInputs(
        gradient_checkpointing=False,
        autocast_dtype=None,
        attn_implementation="sdpa",
        micro_batch=micro,
        seq_len=seq,
        chunked_loss=True,
        loss_chunk_size=1024,
    )
    return estimate_memory(meta, inputs, cuda_overhead=False).total


def default_model() -> str | None:
    found = sorted(CACHED_SMOLLM2.glob("smollm2-135m-instruct-*/config.json"))
    return str(found[-1].parent) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model(), help="a Hugging Face model folder or hub id")
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        parser.error("--model is required (no converted SmolLM2 in ~/.cache/sftkit-tests; run the tests once)")
    print(
        f"model {args.model}; micro {args.micro} × seq {args.seq}; fp32 weights (QLoRA: NF4 + bf16 compute); "
        f"LoRA r16 on all linear layers; AdamW; {torch.get_num_threads()} threads"
    )
    steps = {method: Step(args.model, method, args.micro, args.seq) for method in ("lora", "qlora")}
    times: dict[str, list[tuple[float, float]]] = {method: [] for method in steps}
    for _ in range(args.rounds):
        for method, step in steps.items():
            times[method].append(step.run())
    header = (
        f"{'method':<6} {'weights':>9} {'peak':>9} {'plan':>9} {'plan err':>8} {'wall s':>7} {'CPU s':>7}"
        "   (median step; every round's wall s)"
    )
    print(header)
    print("-" * len(header))
    wall, cpu, peaks = {}, {}, {}
    for method, step in steps.items():
        peaks[method] = step.peak_bytes()
        wall[method] = statistics.median(t for t, _ in times[method])
        cpu[method] = statistics.median(c for _, c in times[method])
        estimate = plan_estimate(args.model, method, args.micro, args.seq)
        print(
            f"{method:<6} {step.weight_bytes() / MIB:>7.1f}Mi {peaks[method] / MIB:>7.1f}Mi {estimate / MIB:>7.1f}Mi "
            f"{(estimate - peaks[method]) / peaks[method]:>+8.1%} {wall[method]:>7.2f} {cpu[method]:>7.2f}"
            f"   ({', '.join(f'{t:.2f}' for t, _ in times[method])})"
        )
    print(
        f"qlora / lora: peak memory {peaks['qlora'] / peaks['lora']:.2f}×, weights "
        f"{steps['qlora'].weight_bytes() / steps['lora'].weight_bytes():.2f}×, step time "
        f"{wall['qlora'] / wall['lora']:.2f}× wall, {cpu['qlora'] / cpu['lora']:.2f}× CPU (interleaved rounds)"
    )


if __name__ == "__main__":
    main()
