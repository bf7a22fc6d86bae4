"""GGUF export of a LoRA-tuned SmolLM2-135M-Instruct, every quantisation: export time, file size, and
agreement with the merged model once read back by transformers' GGUF reader.

    python bench/export_gguf.py                 # all of sftkit.export.QUANTS
    python bench/export_gguf.py --quants f16 q8_0
    python bench/export_gguf.py --run RUN_DIR       # export a finished run instead of training one

Trains the 3-step LoRA run of tests/test_export_real.py (`trainable_tokens: auto`) once, then for each
quantisation: `sftkit.export` wall time, file size, and over every position of the 5 chat prompts of
the tests: max |Δlogit|, mean KL(merged ‖ GGUF) and top-1 agreement. Needs ../shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from tests.conftest import SMOLLM2_GGUF, convert_gguf_to_folder
    from tests.export_helpers import PROMPTS, chat_inputs, compare, train_chat_run
    from transformers import AutoModelForCausalLM

    import sftkit
    from sftkit.export import QUANTS
    from sftkit.merge import load_merged

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", nargs="+", default=list(QUANTS))
    parser.add_argument("--run", type=Path, help="Export this finished run instead of training one.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export_gguf_"))
    if args.run is None:
        stat = SMOLLM2_GGUF.stat()
        cache = Path(os.environ.get("SFTKIT_TEST_CACHE", Path.home() / ".cache" / "sftkit-tests"))
        model_dir = convert_gguf_to_folder(
            SMOLLM2_GGUF, cache / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
        )
        run = train_chat_run(model_dir, work)
    else:
        run = args.run
    merged, tokenizer, template, _ = load_merged(run / "adapter", torch.float32)
    inputs = chat_inputs(tokenizer, template, PROMPTS)
    print(f"{sum(map(len, inputs))} positions over {len(PROMPTS)} prompts; run in {run}")
    print("| quant | export s | size MiB | max abs Δlogit | mean KL | top-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for quant in args.quants:
        start = time.perf_counter()
        result = sftkit.export(run, work / quant, quant=quant)
        seconds = time.perf_counter() - start
        reloaded = AutoModelForCausalLM.from_pretrained(result.path.parent, gguf_file=result.path.name)
        figures = compare(merged, reloaded, inputs)
        print(
            f"| {quant} | {seconds:.1f} | {result.path.stat().st_size / 2**20:.1f} | {figures['max_abs_logit']:.4f} "
            f"| {figures['mean_kl']:.2e} | {figures['top1']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
