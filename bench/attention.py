"""Packed attention: the dense block-causal mask (sdpa) against the per-example varlen kernel.

    python bench/attention.py            # CPU: seq 2048/4096/8192 × 2/8/32 examples per pack
    python bench/attention.py --quick    # CPU: seq 2048 only, 1 timed step
    python bench/attention.py --gpu      # CUDA, bf16, 8B-shaped attention layers (32 heads / 8 KV heads × 128)

One training step (forward, backward, AdamW) of a small GQA Llama through sftkit's own forward
(`CausalLMLoss`, the collator's batch) on one pack of `seq` tokens split into N examples of random
lengths. Both paths compute the same loss; the dense path builds a (1, 1, seq, seq) mask and
scores seq² pairs per head, varlen scores Σ l². The paths alternate step by step (dense, varlen,
dense, varlen, …) so that machine noise hits both alike; tokens/s is seq / the median step time.

Peak memory: on CPU the peak of live tensor storage during a step, counted with a dispatch mode (the
quantity `torch.cuda.max_memory_allocated` reports on a GPU; see bench/plan_accuracy.py); on CUDA
`max_memory_allocated` itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sftkit.model.attention  # noqa: F401  (registers attn_implementation = "varlen")
from plan_accuracy import LiveStorage  # bench/ is the script's folder, so on sys.path
from sftkit.data.collate import collate
from sftkit.train.forward import CausalLMLoss
from sftkit.train.optim import build_optimizer

PATHS = ("sdpa", "varlen")  # sdpa here is the dense block-causal mask sftkit builds for it


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


CPU_SHAPE = Shape(layers=2, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
GPU_SHAPE = Shape(layers=2, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=8192)


def example_lengths(seq: int, count: int, seed: int) -> list[int]:
    """`count` random lengths (each ≥ 16) summing to `seq`: uneven, like real packs."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=generator) + 0.2
    lengths = (weights / weights.sum() * (seq - 16 * count)).floor().long() + 16
    lengths[0] += seq - int(lengths.sum())
    return lengths.tolist()


def pack(seq: int, count: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seq + count)
    examples = []
    for n in example_lengths(seq, count, seed=seq * count):
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return {k: v.to(device) for k, v in collate([examples], pad_token_id=0).items()}


def build(shape: Shape, attn: str, device: str, dtype: torch.dtype) -> tuple[CausalLMLoss, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation(attn)
    model.config.use_cache = False
    model.train()
    return CausalLMLoss(model, attn, chunked=True), build_optimizer(model, 1e-5, 0.0, (0.9, 0.999), 1e-8)


def step(loss_model: CausalLMLoss, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = loss_model(**batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def timed(loss_model, optimizer, batch, device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    loss = step(loss_model, optimizer, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, loss


def peak_bytes(loss_model, optimizer, batch, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(loss_model, optimizer, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    with LiveStorage([*loss_model.parameters(), *loss_model.buffers(), *states, *batch.values()]) as tracker:
        step(loss_model, optimizer, batch)
    return tracker.peak


def measure(seq: int, count: int, shape: Shape, device: str, dtype: torch.dtype, steps: int) -> dict[str, dict]:
    batch = pack(seq, count, shape.vocab, device)
    built = {attn: build(shape, attn, device, dtype) for attn in PATHS}
    results: dict[str, dict] = {}
    for attn, (loss_model, optimizer) in built.items():
        step(loss_model, optimizer, batch)  # warm-up: AdamW state, kernels
        results[attn] = {"peak": peak_bytes(loss_model, optimizer, batch, device), "times": [], "loss": None}
    for _ in range(steps):  # interleaved: dense, varlen, dense, varlen, …
        for attn, (loss_model, optimizer) in built.items():
            seconds, loss = timed(loss_model, optimizer, batch, device)
            results[attn]["times"].append(seconds)
            results[attn]["loss"] = loss
    for result in results.values():
        result["tokens_per_s"] = seq / statistics.median(result["times"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, 8B-shaped attention layers")
    parser.add_argument("--quick", action="store_true", help="seq 2048 only, 1 timed step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path (default 2 CPU, 5 GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    device, dtype, shape = ("cuda", torch.bfloat16, GPU_SHAPE) if args.gpu else ("cpu", torch.float32, CPU_SHAPE)
    torch.set_num_threads(args.threads)
    steps = 1 if args.quick else args.steps or (5 if args.gpu else 2)
    seqs = (2048,) if args.quick else (2048, 4096, 8192)
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} thread(s)"
    print(
        f"{where}; {dtype}; Llama {shape.layers} layers × {shape.hidden}, {shape.heads} heads / {shape.kv_heads} KV "
        f"heads; one pack per step; median of {steps} interleaved steps after a warm-up\n"
    )
    print(
        "| seq | examples | dense tok/s | varlen tok/s | speed-up | dense peak MiB | varlen peak MiB | memory saved |"
        " loss Δ |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seq in seqs:
        for count in (2, 8, 32):
            r = measure(seq, count, shape, device, dtype, steps)
            dense, varlen = r["sdpa"], r["varlen"]
            print(
                f"| {seq} | {count} | {dense['tokens_per_s']:.0f} | {varlen['tokens_per_s']:.0f} | "
                f"{varlen['tokens_per_s'] / dense['tokens_per_s']:.2f}× | {dense['peak'] / 2**20:.0f} | "
                f"{varlen['peak'] / 2**20:.0f} | {1 - varlen['peak'] / dense['peak']:.0%} | "
                f"{abs(dense['loss'] - varlen['loss']) / abs(dense['loss']):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
