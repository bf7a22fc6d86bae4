"""The GPU check in one command: the CUDA tests, a QLoRA step, then the three GPU benchmarks.

    python bench/gpu_check.py                      # on a CUDA machine with sftkit's dependencies installed
    python3 bench/gpu_check.py --wheels .whl       # on a bare CUDA image: installs bench/fetch_wheels.sh's wheels first
    python bench/gpu_check.py --dry                # anywhere: the same stages on CPU at their smallest
    python bench/gpu_check.py --stages qlora       # some stages only (names below, comma-separated)

Stages, each its own process, each printed with its exit status and time:
  environment  versions of torch, transformers, ... and every range of pyproject.toml checked against them
  tests        pytest -m cuda (but the QLoRA file): packed == alone on varlen / sdpa / flash (when installed) in
               bf16, the varlen kernel against SDPA per example, compiled == eager, ...
  qlora        pytest -m cuda tests/test_qlora.py: a QLoRA step on CUDA (4-bit NF4, bf16 compute), resume == the
               uninterrupted run, GA == one big batch, merge (needs bitsandbytes)
  vs_trl       bench/vs_trl.py --gpu: Llama-3-8B-shaped LoRA bf16 at seq 4096: tokens/s, MFU (its FLOP rule
               printed), peak memory; sftkit vs TRL in the same run
  attention    bench/attention.py --gpu: dense mask vs varlen, seq 2048/4096/8192 × 2/8/32 examples per pack
  compile      bench/compile.py --device cuda: torch_compile, compile time, step time and loss against eager
               (SmolLM2-135M from ../shared; where that is absent, a random model of its shape)
The dry mode runs the test stages as they are (every `cuda` test skips without a GPU: it proves they are
collected and import), and the benchmarks at their smallest (`--quick`), on CPU: wiring, not figures. Without
CUDA the dry mode is chosen by itself, and says so.

`--wheels DIR` installs DIR/*.whl with `pip install --no-index --no-deps --target` into a folder that every stage
then imports from (PYTHONPATH), and puts src/ on the path, so nothing is installed into the image itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "tests", "qlora", "vs_trl", "attention", "compile")
REPORTED = ("torch", "transformers", "accelerate", "peft", "datasets", "pydantic", "trl", "bitsandbytes", "flash-attn")


def install_wheels(wheels: Path) -> str:
    """Install every wheel of `wheels` into a folder of its own, alone (no index, no dependencies); its path."""
    target = Path(tempfile.gettempdir()) / "sftkit-gpu-check-site"
    found = sorted(str(path) for path in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no .whl file there; fetch them with bash bench/fetch_wheels.sh")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*command, "--target", str(target), *found], check=True)
    print(f"installed {len(found)} wheels from {wheels} into {target}", flush=True)
    return str(target)


def environment() -> int:
    """Print the versions that matter, and check pyproject.toml's ranges against them: 1 when one is unmet."""
    import tomllib
    from packaging.requirements import Requirement

    for name in REPORTED:
        try:
            print(f"  {name:14} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {name:14} not installed")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"  CUDA {torch.version.cuda}, {device}; Python {sys.version.split()[0]}")
    with open(ROOT / "pyproject.toml", "rb") as file:
        requirements = [Requirement(line) for line in tomllib.load(file)["project"]["dependencies"]]
    unmet = []
    for requirement in requirements:
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{requirement} (installed: {version or 'none'})")
    print("  every dependency in its range" if not unmet else "  out of range: " + "; ".join(unmet))
    return 1 if unmet else 0


def smollm2_shaped(folder: Path) -> Path:
    """A random model of SmolLM2-135M's shape, for the compile stage where ../shared's GGUF is absent: compile
    and step times depend on the shapes, not on the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def commands(dry: bool, chosen: list[str]) -> dict[str, list[str]]:
    python = sys.executable
    gpu_or_quick = "--quick" if dry else "--gpu"
    compile_args = ["--quick", "--device", "cpu"] if dry else ["--device", "cuda"]
    smollm2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
    if not dry and "compile" in chosen and not smollm2.exists():
        compile_args += ["--model", str(smollm2_shaped(Path(tempfile.gettempdir()) / "sftkit-smollm2-shaped"))]
    return {
        "environment": [python, __file__, "--environment"],
        "tests": [python, "-m", "pytest", "-q", "-m", "cuda", "-rs", "--ignore=tests/test_qlora.py"],
        "qlora": [python, "-m", "pytest", "-q", "-m", "cuda", "-rs", "tests/test_qlora.py"],
        "vs_trl": [python, "bench/vs_trl.py", gpu_or_quick],
        "attention": [python, "bench/attention.py", gpu_or_quick],
        "compile": [python, "bench/compile.py", *compile_args],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU stand-in of every stage (wiring only)")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (a bare CUDA image)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument(
        "--budget",
        type=float,
        default=570,
        help="seconds for all stages on a GPU (a device call allows 600); a stage "
        "still running then is stopped and reported as over budget (the dry mode has none)",
    )
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.environment:
        raise SystemExit(environment())
    chosen = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    paths = [str(ROOT / "src"), str(ROOT / "bench")]
    if args.wheels:
        paths.insert(0, install_wheels(args.wheels))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path[:0] = paths
    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("No CUDA device: running the dry mode (CPU, smallest settings; no GPU figures).")
    failed = []
    began_all = time.perf_counter()
    every_command = commands(dry, chosen)
    for name in chosen:
        command = every_command[name]
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        began = time.perf_counter()
        left = None if dry else max(1.0, args.budget - (began - began_all))
        try:
            code: int | str = subprocess.run(command, cwd=ROOT, check=False, timeout=left).returncode
        except subprocess.TimeoutExpired:
            code = f"stopped: over the {args.budget:.0f} s budget"
        print(f"===== {name}: exit {code}, {time.perf_counter() - began:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    outcome = "FAILED: " + ", ".join(failed) if failed else "all passed"
    elapsed = time.perf_counter() - began_all
    print(f"\ngpu-check{' (dry, CPU)' if dry else ''}: {len(chosen)} stages in {elapsed:.0f} s, {outcome}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
