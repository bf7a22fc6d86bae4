"""Masked tokenization cost as conversations get longer, with the same tokens in all.

    python bench/turns.py                  # 1, 5, 20, 50 turns; llama2, chatml, zephyr
    python bench/turns.py --turns 1 50     # two lengths

Each row is the same 2,000 GSM8K exchanges (seeded), grouped into conversations of N user/assistant
turns: 2,000 one-turn conversations, 400 of five turns, ... Masking renders, per assistant turn, the
conversation up to the turn with and without the generation prompt: rendering every prefix costs turns²
template work per conversation. Templates that render each message on their own (`message_local`:
llama2, chatml) take every prefix from one rendering; zephyr reads `loop.last`, so it renders every
prefix. For each template, both ways are timed in the same process (best of 3 `tokenize_batch` calls,
one process, one core): `as run` is what sftkit does, `every prefix` forces the prefix renders on every
template (zephyr is the control: both columns are the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama2"
EXCHANGES = 2000


def conversations(turns: int) -> list[list[dict[str, str]]]:
    exchanges = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    chosen = random.Random(0).choices(exchanges, k=EXCHANGES)
    out = []
    for start in range(0, EXCHANGES, turns):
        messages = []
        for exchange in chosen[start : start + turns]:
            messages += [
                {"role": "user", "content": exchange["question"]},
                {"role": "assistant", "content": exchange["answer"]},
            ]
        out.append(messages)
    return out


def best_seconds(batch: dict, tokenizer, options, repeats: int = 3) -> float:
    from sftkit.data.tokenize import tokenize_batch

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tokenize_batch(batch, tokenizer, options)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 5, 20, 50])
    parser.add_argument("--templates", nargs="+", default=["llama2", "chatml", "zephyr"])
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from sftkit.data import hf_chat
    from sftkit.data import template as template_module
    from sftkit.data.tokenize import TokenizeOptions

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    print(f"{EXCHANGES} GSM8K exchanges in all; tokenize_batch, best of 3, 1 process")
    print(
        f"{'template':10} {'turns':>5} {'rows':>5} {'message-local':>13} {'as run s':>9} "
        f"{'every prefix s':>14} {'ratio':>6}"
    )
    for name in args.templates:
        text = template_module.resolve_chat_template(name, tokenizer)
        options = TokenizeOptions(template=text, max_seq_length=1_000_000)
        local = hf_chat.prefix_reuse(text)
        for turns in args.turns:
            batch = {"messages": conversations(turns)}
            fast = best_seconds(batch, tokenizer, options)
            with mock.patch.object(hf_chat, "prefix_reuse", lambda _: False):
                slow = best_seconds(batch, tokenizer, options)
            print(
                f"{name:10} {turns:>5} {len(batch['messages']):>5} {local!s:>13} {fast:>9.2f} {slow:>14.2f} "
                f"{slow / fast:>5.2f}×",
                flush=True,
            )


if __name__ == "__main__":
    main()
