"""The GPU check in one command: the CUDA tests, then the two GPU benchmarks.

    python bench/gpu_check.py          # on a CUDA machine (what `make gpu-check` runs)
    python bench/gpu_check.py --dry    # anywhere: the same four stages on CPU at their smallest

Stages, each its own process, each printed with its exit status and time:
  1. pytest -m cuda                    packed == alone on varlen / sdpa / flash (when installed) in bf16,
                                       the varlen kernel against SDPA per example, and the other `cuda` tests
  2. bench/vs_trl.py --gpu             Llama-3-8B-shaped LoRA bf16 at seq 4096: tokens/s, MFU (its FLOP rule
                                       printed), peak memory; sftkit vs TRL in the same run
  3. bench/attention.py --gpu          dense mask vs varlen, seq 2048/4096/8192 × 2/8/32 examples per pack
  4. bench/compile.py --device cuda    torch_compile: compile time, step time and loss against eager (bf16)
The dry mode runs stage 1 as is (every `cuda` test skips without a GPU: it proves they are collected and
import), and stages 2-4 at their smallest (`--quick`), on CPU. It checks the wiring, not the figures.
Without CUDA the dry mode is chosen by itself, and says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stages(dry: bool) -> list[tuple[str, list[str]]]:
    python = sys.executable
    gpu_or_quick = "--quick" if dry else "--gpu"
    return [
        ("CUDA tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-rs"]),
        ("sftkit vs TRL", [python, "bench/vs_trl.py", gpu_or_quick]),
        ("packed attention", [python, "bench/attention.py", gpu_or_quick]),
        (
            "torch_compile",
            [python, "bench/compile.py", *(["--quick", "--device", "cpu"] if dry else ["--device", "cuda"])],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU stand-in of every stage (wiring only)")
    args = parser.parse_args()
    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("No CUDA device: running the dry mode (CPU, smallest settings; no GPU figures).")
    failed = []
    for name, command in stages(dry):
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        began = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        print(f"===== {name}: exit {code}, {time.perf_counter() - began:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    outcome = "FAILED: " + ", ".join(failed) if failed else "all stages passed"
    print(f"\ngpu-check{' (dry, CPU)' if dry else ''}: {outcome}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
