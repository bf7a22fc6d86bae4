"""Batched greedy generation against one prompt at a time, on the real SmolLM2-135M-Instruct (CPU).

Both sides generate the same GSM8K test prompts with `sftkit.evaluate.generation.generate_batched`; the
batched side pads on the left. Rounds are interleaved (batched, one at a time, batched, ...) so a machine
shared with other work slows both sides alike. Prints how many outputs are identical token for token and
the speed-up (median time of one side over the other).

    python bench/eval_batching.py --prompts 32 --max-new-tokens 64 --batch-size 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sftkit.data.template import resolve_chat_template
from sftkit.evaluate import load_eval_examples
from sftkit.evaluate.generation import generate_batched
from sftkit.model.load import load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(GGUF), help="a model folder or GGUF file")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, torch.float32, vocab_size=len(tokenizer))
    template = resolve_chat_template(None, tokenizer)
    examples = load_eval_examples(
        str(SHARED / "data" / "gsm8k" / "test.jsonl"),
        columns={"prompt": "question", "completion": "answer"},
        limit=args.prompts,
    )
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    outputs = {}
    for _ in range(args.rounds):
        for side, size in (("batched", args.batch_size), ("one_at_a_time", 1)):
            start = time.perf_counter()
            outputs[side] = generate_batched(model, tokenizer, template, examples, args.max_new_tokens, size)
            times[side].append(time.perf_counter() - start)
    identical = sum(
        a.token_ids == b.token_ids for a, b in zip(outputs["batched"], outputs["one_at_a_time"], strict=True)
    )
    new_tokens = sum(len(g.token_ids) for g in outputs["batched"])
    medians = {side: statistics.median(values) for side, values in times.items()}
    print(
        json.dumps(
            {
                "prompts": len(examples),
                "identical_outputs": identical,
                "new_tokens": new_tokens,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "rounds": args.rounds,
                "seconds": times,
                "speedup": medians["one_at_a_time"] / medians["batched"],
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
