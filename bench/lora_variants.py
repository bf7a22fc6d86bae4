"""LoRA variants side by side: training step time, and how far the merged model is from base + adapter.

What is measured, for LoRA, DoRA, rsLoRA and PiSSA on the same model (r 16, every linear layer):
  step time   full training steps (forward, chunked loss, backward, AdamW) on the same random batches;
              the variants take turns step by step (L D R P L D R P …) in one process, so load on a
              shared machine hits them alike; the median per variant and the ratio to LoRA are printed.
  merge       after those steps the adapter is saved as training saves it (`save_adapter`: PiSSA is
              rewritten against the original base), loaded on a fresh copy of the original base and
              merged with peft's `merge_and_unload`; the merged model's logits are compared with the
              trained model's (unmerged) on a fixed batch: max |Δ logit| and that over max |logit|.

    python bench/lora_variants.py                    # SmolLM2-135M-Instruct from ../shared, CPU
    python bench/lora_variants.py --model PATH       # any local model folder
    python bench/lora_variants.py --quick            # tiny random Llama, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile import default_model, tiny_model
from sftkit.model.adapters import (
    AdapterOptions,
    LoraVariant,
    apply_adapters,
    initial_adapter_state,
    save_adapter,
)
from sftkit.model.load import load_model
from sftkit.train.forward import CausalLMLoss
from sftkit.train.optim import build_optimizer

VARIANTS = {
    "lora": LoraVariant(),
    "dora": LoraVariant(use_dora=True),
    "rslora": LoraVariant(use_rslora=True),
    "pissa": LoraVariant(init_lora_weights="pissa"),
}


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "input_ids": ids,
        "targets": ids.roll(-1, 1),
        "segment_ids": torch.ones_like(ids),
        "position_ids": torch.arange(ids.shape[1]).repeat(ids.shape[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="high enough that the adapters move well away from init")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq = 3, 64
        model_path = tiny_model(Path(tempfile.gettempdir()) / "sftkit-bench-compile-tiny")
    else:
        model_path = args.model or default_model()
    print(
        f"model {model_path}, CPU fp32, r 16 all-linear, batch {args.batch} × seq {args.seq}, {args.steps} steps "
        f"per variant, interleaved, {torch.get_num_threads()} threads",
        flush=True,
    )

    runs = {}
    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        model = apply_adapters(
            load_model(str(model_path), torch.float32), AdapterOptions(r=16, alpha=32, dropout=0.0, variant=variant)
        )
        runs[name] = {
            "model": model,
            "initial": initial_adapter_state(model, variant),
            "times": [],
            "loss": CausalLMLoss(model, "sdpa", chunked=True),
            "optimizer": build_optimizer(model, args.lr, 0.0, (0.9, 0.999), 1e-8),
        }
    vocab = runs["lora"]["model"].get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        batch = batch_of(torch.randint(0, vocab, (args.batch, args.seq), generator=generator))
        for run in runs.values():
            started = time.perf_counter()
            run["loss"](**batch).backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            run["times"].append(time.perf_counter() - started)

    from peft import PeftModel

    probe = torch.randint(0, vocab, (2, 64), generator=generator)
    lora_median = statistics.median(runs["lora"]["times"][1:])
    print(f"{'variant':<8}{'median step s':>15}{'vs LoRA':>9}{'max |Δ logit| merged':>23}{'relative':>10}")
    for name, run in runs.items():
        model = run["model"].eval()
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            save_adapter(model, Path(folder), run["initial"])
            merged = PeftModel.from_pretrained(load_model(str(model_path), torch.float32), folder).merge_and_unload()
            trained = model(input_ids=probe).logits  # (batch, seq, vocab)
            difference = (merged.eval()(input_ids=probe).logits - trained).abs().max().item()
            scale = trained.abs().max().item()
        median = statistics.median(run["times"][1:])
        print(f"{name:<8}{median:>15.3f}{median / lora_median:>8.2f}×{difference:>23.2e}{difference / scale:>10.1e}")
        del merged


if __name__ == "__main__":
    main()
