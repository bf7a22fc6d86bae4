"""`torch_compile: true` against eager: compile time, step time and loss agreement on a real model.

What is measured: full training steps (forward, chunked loss, backward, AdamW) of sftkit's own pieces
(`load_model`, `apply_adapters`, `compile_decoder_layers`, `CausalLMLoss`) on random tokens whose
sequence length varies step to step (as packed batches do). Each mode runs in a fresh process with
an empty inductor cache, so the compile time is a cold one, in the order eager, compiled, eager: the
two eager runs bracket the compiled one, so a machine whose load drifts shows it as a gap between them.

    compile time  = first compiled step − median eager step (graph capture + inductor codegen)
    step time     = median over the steps after the first (each length seen once before is not needed:
                    layers compile with dynamic shapes)
    loss          = max relative difference of the per-step losses, compiled vs eager

    python bench/compile.py                            # SmolLM2-135M-Instruct from ../shared, CPU
    python bench/compile.py --model PATH --device cuda # any local model folder; on a GPU
    python bench/compile.py --quick                    # tiny random Llama, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    """SmolLM2-135M-Instruct as a plain folder, converted from ../shared's GGUF once (the test fixture's cache)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import SMOLLM2_GGUF, convert_gguf_to_folder

    if not SMOLLM2_GGUF.exists():
        raise SystemExit(f"{SMOLLM2_GGUF} not present; give --model PATH")
    stat = SMOLLM2_GGUF.stat()
    cache = Path(os.environ.get("SFTKIT_TEST_CACHE", Path.home() / ".cache" / "sftkit-tests"))
    return convert_gguf_to_folder(SMOLLM2_GGUF, cache / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}")


def tiny_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=1024,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).save_pretrained(folder)
    return folder


def run_mode(model_path: str, compiled: bool, device: str, steps: int, batch: int, seq: int, finetuning: str) -> dict:
    """One process, one mode: per-step wall times and losses."""
    import torch

    from sftkit.data.collate import cu_seqlens
    from sftkit.model.adapters import AdapterOptions, apply_adapters
    from sftkit.model.compile import compile_decoder_layers
    from sftkit.model.load import load_model
    from sftkit.train.forward import CausalLMLoss
    from sftkit.train.optim import build_optimizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = apply_adapters(load_model(model_path, dtype), AdapterOptions(finetuning=finetuning, r=16, dropout=0.0))
    layers = compile_decoder_layers(model) if compiled else 0
    model.to(device)
    loss_model = CausalLMLoss(model, "sdpa", chunked=True)
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(1)
    times, losses = [], []
    for step in range(steps):
        length = seq - 16 * (step % 4)  # varying lengths, as packs have
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
        inputs = {
            "input_ids": ids,
            "targets": ids.roll(-1, 1),
            "segment_ids": torch.ones_like(ids),
            "position_ids": torch.arange(length, device=device).repeat(batch, 1),
            "cu_seqlens": cu_seqlens([[length]] * batch, length).to(device),  # one example per row
        }
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = loss_model(**inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss.item() / (batch * length))
    return {"compiled": compiled, "layers": layers, "times": times, "losses": losses}


def in_subprocess(args: argparse.Namespace, model_path: Path, compiled: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        # src/ first, and the caller's path kept (gpu_check.py's carried wheels live there)
        path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": path}
        command = [
            sys.executable,
            __file__,
            "--one",
            json.dumps([str(model_path), compiled, args.device, args.steps, args.batch, args.seq, args.finetuning]),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{'compiled' if compiled else 'eager'} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--finetuning", default="lora", choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 5 steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_mode(*json.loads(args.one))))
        return
    if args.quick:
        args.steps, args.seq = 5, 64
        model_path = tiny_model(Path(tempfile.gettempdir()) / "sftkit-bench-compile-tiny")
    else:
        model_path = args.model or default_model()
    print(
        f"model {model_path}, device {args.device}, {args.finetuning}, batch {args.batch} × seq {args.seq - 48}–"
        f"{args.seq}, {args.steps} steps, order eager → compiled → eager, cold inductor cache",
        flush=True,
    )
    first_eager = in_subprocess(args, model_path, False)
    compiled = in_subprocess(args, model_path, True)
    second_eager = in_subprocess(args, model_path, False)

    eager_steps = first_eager["times"][1:] + second_eager["times"][1:]
    eager_median = statistics.median(eager_steps)
    compiled_median = statistics.median(compiled["times"][1:])
    compile_time = compiled["times"][0] - eager_median
    loss_difference = max(abs(c - e) / abs(e) for c, e in zip(compiled["losses"], first_eager["losses"], strict=True))
    print(f"{'mode':<10}{'first step s':>14}{'median step s':>15}")
    for name, run in (("eager", first_eager), ("compiled", compiled), ("eager", second_eager)):
        print(f"{name:<10}{run['times'][0]:>14.2f}{statistics.median(run['times'][1:]):>15.3f}")
    print(f"compiled decoder layers: {compiled['layers']}")
    print(f"compile time: {compile_time:.1f} s (first compiled step − median eager step)")
    print(
        f"step time: eager {eager_median:.3f} s, compiled {compiled_median:.3f} s → "
        f"speed-up {eager_median / compiled_median:.2f}× "
        f"(eager runs: {statistics.median(first_eager['times'][1:]):.3f} "
        f"/ {statistics.median(second_eager['times'][1:]):.3f} s)"
    )
    print(
        f"break-even after {compile_time / max(eager_median - compiled_median, 1e-9):.0f} steps"
        if compiled_median < eager_median
        else "no break-even: compiled steps are not faster here"
    )
    print(f"loss, compiled vs eager: max relative difference {loss_difference:.2e} over {args.steps} steps")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
