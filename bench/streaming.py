"""Streaming against tokenizing first: time to the first step, training throughput, host memory as rows grow.

    python bench/streaming.py                        # 2k, 20k and 100k rows, 40 steps each
    python bench/streaming.py --rows 2000 --steps 10 # smoke run

Data and model as in bench/data_scale.py: ultrachat-shaped conversations (5 GSM8K exchanges, ~1,000
Llama-2 tokens each), `llama2` template, max_seq_length 2048, packing, a tiny random Llama (2 × 64),
one micro-batch of 1 sequence per step. Per size, each in its own process on a cold `datasets` cache:

  offline     `sftkit train` as usual: read + tokenize every row (map processes), pack, then the steps
  streaming   `sftkit train` with `streaming: true`, `packing_buffer` 2000: rows are read, tokenized
              and packed while training; only what the steps need is ever read. The first buffer is
              filled before step 1, so 40 steps of 1 sequence never refill it: the step rate is
              the loop's alone and the tokenizing shows in the wall time
  stream-64   the same with `packing_buffer` 64: a refill every ~30 steps, so tokenizing on the fly
              falls inside the steps' rate (and small buffers pack less tightly)

Reported: wall time of the whole command (offline: tokenizing included), the steps' trained tokens/s
(median over logging windows: with streaming it includes tokenizing on the fly), peak summed RSS and
PSS of the process tree, and the pack fill, tokens / (packs × max_seq_length) (offline: all packs;
streaming: the first buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from data_scale import measure, sftkit_config, write_conversations  # noqa: E402
from make_tiny_llama import make_tiny_llama  # noqa: E402

KINDS = ("offline", "streaming", "stream-64")


def run(kind: str, rows: int, data: Path, model: Path, workdir: Path, steps: int, num_proc: int) -> dict:
    output_dir = workdir / f"{kind}-{rows}"
    config = sftkit_config(model, data, output_dir, num_proc)
    config.update(max_steps=steps, logging_steps=5)
    if kind != "offline":
        config.update(streaming=True, packing_buffer=2000 if kind == "streaming" else 64)
    path = workdir / f"{kind}-{rows}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_CACHE": str(workdir / f"cache-{kind}-{rows}"),
    }
    figures = measure([sys.executable, "-m", "sftkit.cli", "train", str(path)], env, workdir / f"{kind}-{rows}.log")
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["trained_tokens_per_s"] for row in metrics if "trained_tokens_per_s" in row]
    stats = json.loads((output_dir / "data_stats.json").read_text())
    fill = stats["total_tokens"] / (stats["packed_sequences"] * config["max_seq_length"])  # how full the packs are
    return {**figures, "trained_tokens_per_s": statistics.median(rates), "pack_fill": fill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000, 100_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sftkit-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "tiny-llama"
    if not model.exists():
        make_tiny_llama(model, layers=2, hidden=64)
    print(f"workdir {workdir}; {args.steps} steps per run; rows {args.rows}", flush=True)
    lines = [
        "| rows | path | wall s | trained tok/s (steps) | peak RSS (PSS) GiB | pack fill |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results = []
    for rows in args.rows:
        data = workdir / f"chat-{rows}.jsonl"
        if not data.exists():
            write_conversations(data, rows)
        for kind in KINDS:
            figures = run(kind, rows, data, model, workdir, args.steps, args.num_proc)
            results.append({"rows": rows, "kind": kind, **figures})
            lines.append(
                f"| {rows:,} | {kind} | {figures['wall_s']:.1f} | {figures['trained_tokens_per_s']:,.0f} | "
                f"{figures['peak_rss_gib']:.2f} ({figures['peak_pss_gib']:.2f}) | "
                f"{figures['pack_fill']:.4f} |"
            )
            print("\n".join(lines), flush=True)
            (workdir / "streaming.json").write_text(json.dumps(results, indent=2))
    by = {(r["rows"], r["kind"]): r for r in results}
    for rows in args.rows:
        off = by[(rows, "offline")]
        for kind in KINDS[1:]:
            on = by[(rows, kind)]
            print(
                f"{rows:,} rows: {kind} / offline wall {on['wall_s'] / off['wall_s']:.2f}×, step throughput "
                f"{on['trained_tokens_per_s'] / off['trained_tokens_per_s']:.2f}×, pack fill "
                f"{on['pack_fill'] - off['pack_fill']:+.4f}"
            )
    if len(args.rows) > 1:
        first, last = args.rows[0], args.rows[-1]
        for kind in KINDS:
            print(
                f"{kind} peak RSS {last:,} / {first:,} rows: "
                f"{by[(last, kind)]['peak_rss_gib'] / by[(first, kind)]['peak_rss_gib']:.2f}×"
            )


if __name__ == "__main__":
    main()
