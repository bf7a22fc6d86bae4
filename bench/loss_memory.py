"""Peak memory of one loss forward + backward: plain cross-entropy vs sftkit's chunked loss.

What is measured: hidden (seq, hidden) → logits → summed CE → backward, the part of a step whose
memory grows with vocab × seq. The output weight is frozen by default (LoRA, sftkit's default;
`--train-weight` adds its gradient). Every target is trained, so the chunked loss skips nothing.

How: every configuration runs in a fresh subprocess so nothing is cached between them.
  CPU:  peak = ru_maxrss after the step (resource.getrusage, the kernel's high-water mark of the
        process's resident memory) − VmRSS just before it (inputs already built and touched).
        torch's CPU allocator caches nothing and tensors this large are mmap'ed by glibc, so RSS
        follows the live tensors. If the step never rose above an earlier high-water mark (imports)
        the figure would be a lower bound; the script checks and marks it with "≤".
  CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the step, after reset.

    python bench/loss_memory.py                   # CUDA when present, else CPU
    python bench/loss_memory.py --device cpu --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCABS = (32_000, 128_256)
SEQS = (2048, 8192)
METHODS = ("plain", "chunked")


def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_one(
    method: str,
    vocab: int,
    seq: int,
    hidden_size: int,
    device: str,
    dtype_name: str,
    train_weight: bool,
    chunk_size: int,
) -> dict:
    """One forward + backward in this process; returns the peak extra memory in bytes."""
    import torch

    from sftkit.train.loss import chunked_cross_entropy_sum, cross_entropy_sum

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    # Built in place, so that building them leaves no high-water mark above what the step will reach.
    hidden = torch.randn(seq, hidden_size, generator=generator).to(device, dtype).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, generator=generator).div_(hidden_size**0.5).to(device, dtype)
    weight.requires_grad_(train_weight)
    targets = torch.randint(0, vocab, (seq,), generator=generator).to(device)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
        high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if method == "plain":
        loss = cross_entropy_sum(hidden @ weight.T, targets)  # (seq, vocab) logits, kept for backward
    else:
        loss = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        lower_bound = False
    else:
        high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = high_water - before
        lower_bound = high_water <= high_water_before
    return {
        "method": method,
        "vocab": vocab,
        "seq": seq,
        "hidden": hidden_size,
        "device": device,
        "dtype": dtype_name,
        "train_weight": train_weight,
        "peak_bytes": peak,
        "lower_bound": lower_bound,
        "seconds": time.perf_counter() - start,
        "loss": loss.item(),
    }


def run_in_subprocess(args: argparse.Namespace, method: str, vocab: int, seq: int, device: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        method,
        str(vocab),
        str(seq),
        "--device",
        device,
        "--hidden",
        str(args.hidden or default_hidden(device)),
        "--dtype",
        args.dtype or default_dtype(device),
        "--chunk-size",
        str(args.chunk_size),
    ] + (["--train-weight"] if args.train_weight else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} vocab {vocab} seq {seq} on {device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_hidden(device: str) -> int:
    return 4096 if device == "cuda" else 2048


def default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def marked(result: dict) -> str:
    return ("≤" if result["lower_bound"] else "") + gib(result["peak_bytes"])


def print_table(results: list[dict]) -> None:
    by_key = {(r["device"], r["vocab"], r["seq"], r["method"]): r for r in results}
    first = results[0]
    print(
        f"\nPeak extra memory of one loss forward+backward ({first['device']}, {first['dtype']}, "
        f"hidden {first['hidden']}, output weight {'trained' if first['train_weight'] else 'frozen'}, batch 1)"
    )
    header = (
        f"{'device':6} {'vocab':>7} {'seq':>5} | {'plain GiB':>9} {'chunked GiB':>11} | {'reduction':>9} | "
        f"{'plain s':>7} {'chunked s':>9} | {'loss rel diff':>13}"
    )
    print(header)
    print("-" * len(header))
    for device, vocab, seq in sorted({(r["device"], r["vocab"], r["seq"]) for r in results}):
        plain, chunked = by_key[(device, vocab, seq, "plain")], by_key[(device, vocab, seq, "chunked")]
        reduction = 1 - chunked["peak_bytes"] / plain["peak_bytes"]
        rel = abs(chunked["loss"] - plain["loss"]) / abs(plain["loss"])
        print(
            f"{device:6} {vocab:>7} {seq:>5} | {marked(plain):>9} {marked(chunked):>11} | {reduction:>8.1%} | "
            f"{plain['seconds']:>7.1f} {chunked['seconds']:>9.1f} | {rel:>13.1e}"
        )
    print("reduction = 1 − chunked / plain peak; goal ≥ 40%.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 2048 CPU, 4096 CUDA)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="hidden/weight dtype (default float32 CPU, bfloat16 CUDA); logits are fp32 either way",
    )
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--train-weight", action="store_true", help="also compute the output weight's gradient")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "VOCAB", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        method, vocab, seq = args.one[0], int(args.one[1]), int(args.one[2])
        print(
            json.dumps(
                measure_one(
                    method, vocab, seq, args.hidden, args.device, args.dtype, args.train_weight, args.chunk_size
                )
            )
        )
        return

    import torch

    has_cuda = torch.cuda.is_available()
    devices = {
        "auto": ["cuda" if has_cuda else "cpu"],
        "all": ["cpu"] + (["cuda"] if has_cuda else []),
        "cpu": ["cpu"],
        "cuda": ["cuda"],
    }[args.device]
    if "cuda" in devices and not has_cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    results = []
    for device in devices:
        for vocab in VOCABS:
            for seq in SEQS:
                for method in METHODS:
                    result = run_in_subprocess(args, method, vocab, seq, device)
                    print(
                        f"  {device} vocab {vocab} seq {seq} {method}: {gib(result['peak_bytes'])} GiB, "
                        f"{result['seconds']:.1f} s",
                        flush=True,
                    )
                    results.append(result)
        print_table([r for r in results if r["device"] == device])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
