"""Tokenization alone against TRL, interleaved: sftkit's masked tokenize map against TRL's unmasked one.

    python bench/tokenize_vs_trl.py                              # 20k and 200k rows, 2 rounds, 2 map processes
    python bench/tokenize_vs_trl.py --rows 2000 --rounds 1       # smoke run
    python bench/tokenize_vs_trl.py --rows 200000 --rounds 1 --num-proc 1
    python bench/tokenize_vs_trl.py --rows 20000 --baseline ../main/src    # also an earlier sftkit, interleaved

`data_scale.py` times `sftkit data inspect`'s tokenize stage against TRL's whole `SFTTrainer` preparation
(tokenize, labels, truncation, packing), which flatters sftkit. Here both sides do the same step and no more:
the `datasets.map` that turns conversations into token ids, written to an Arrow cache. The data and template
are data_scale's (5 GSM8K exchanges per conversation, ~1,000 Llama-2 tokens, sftkit's `llama2` template).

  sftkit  `tokenize_dataset` on the normalised rows: render, find every assistant turn's span, tokenize with
          offsets, label (assistant-only loss), count, and drop nothing (max_seq_length 1,000,000).
  TRL     the map `SFTTrainer` runs for conversational rows: `trl.data_utils._tokenize`, that is
          `apply_chat_template(messages, tokenize=True, return_dict=True)`, no mask, one row per call.

Both read their input memory-mapped from a dataset saved once per size (sftkit: its normalised rows; TRL: the
JSONL as `datasets` reads it), with the same number of map processes; the map's cache files are removed after
each run, so every run writes afresh. Each run is its own process, timed around the map alone, in wall time and in
CPU time (the process and its map processes: what other load on a shared machine moves much less); the sides
alternate (sftkit, TRL, then TRL, sftkit, ...) so that a shared machine's load hits both alike. Both must write
the same number of tokens (the same text, tokenized the same way), which is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama2"


def prepare(rows: int, workdir: Path) -> dict[str, Path]:
    """Each tool's input for `rows` conversations, saved once: {tool: dataset directory}."""
    import datasets

    sys.path.insert(0, str(ROOT / "bench"))
    from data_scale import write_conversations
    from sftkit.config import DatasetSpec
    from sftkit.data.formats import load_source

    data = workdir / f"chat-{rows}.jsonl"
    saved = {"sftkit": workdir / f"sftkit-rows-{rows}", "trl": workdir / f"trl-rows-{rows}"}
    if not data.exists():
        write_conversations(data, rows)
    if not saved["sftkit"].exists():
        loaded = load_source(DatasetSpec(path=str(data)), None, False, 1)
        loaded.dataset.add_column("source", [loaded.name] * len(loaded.dataset)).save_to_disk(saved["sftkit"])
    if not saved["trl"].exists():
        datasets.load_dataset("json", data_files=str(data), split="train").save_to_disk(saved["trl"])
    return saved


def trl_tokenize(example: dict, processing_class, chat_template: str) -> dict:
    """What SFTTrainer's tokenize map does with a conversational row (trl 1.16, no assistant mask)."""
    from trl.data_utils import _tokenize

    processed = _tokenize(
        processing_class,
        example["messages"],
        return_assistant_tokens_mask=False,
        chat_template=chat_template,
        tools=None,
    )
    return {"input_ids": processed["input_ids"]}


def worker(tool: str, saved: Path, num_proc: int) -> None:
    """One timed map in this process; prints RESULT {seconds, tokens}."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    from sftkit.data.template import resolve_chat_template
    from sftkit.data.tokenize import TokenizeOptions, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    template = resolve_chat_template("llama2", tokenizer)
    rows = datasets.load_from_disk(str(saved))
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    if tool == "sftkit":
        options = TokenizeOptions(template=template, max_seq_length=1_000_000)
        tokenized = tokenize_dataset(rows, tokenizer, options, num_proc).dataset
    else:
        tokenized = rows.map(
            trl_tokenize,
            fn_kwargs={"processing_class": tokenizer, "chat_template": template},
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=rows.column_names,
            desc="Tokenizing train dataset",
        )
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    ids = tokenized.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    tokens = int(pc.sum(pc.list_value_length(ids)).as_py())
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": cpu, "tokens": tokens}), flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of its map processes once they have exited (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(tool: str, saved: Path, num_proc: int, source: Path = ROOT / "src") -> dict:
    """One worker process; `source`: the sftkit it imports."""
    env = {
        **os.environ,
        "PYTHONPATH": str(source),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    command = [sys.executable, __file__, "--worker", tool, "--saved", str(saved), "--num-proc", str(num_proc)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    finally:
        for cache in saved.glob("cache-*.arrow"):  # the map's output: every run writes afresh
            cache.unlink()
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs per size (the order alternates)")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and saved inputs here")
    parser.add_argument("--baseline", type=Path, help="another sftkit's src folder, run as a third side ('before')")
    parser.add_argument("--worker", choices=["sftkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--saved", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.saved, args.num_proc)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sftkit-tokenize-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; {args.num_proc} map processes; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'rows':>8} {'round':>5} {'side':>6} {'wall s':>7} {'CPU s':>7} {'tokens/s':>10} {'load':>5}", flush=True)
    for rows in args.rows:
        saved = prepare(rows, workdir)
        sides = ["sftkit", "trl"] + (["before"] if args.baseline else [])
        figures: dict[str, dict[str, list[float]]] = {side: {"seconds": [], "cpu_s": []} for side in sides}
        tokens: dict[str, int] = {}
        for number in range(args.rounds):
            for side in sides if number % 2 == 0 else sides[::-1]:
                if side == "before":
                    result = run("sftkit", saved["sftkit"], args.num_proc, args.baseline)
                else:
                    result = run(side, saved[side], args.num_proc)
                for key in ("seconds", "cpu_s"):
                    figures[side][key].append(result[key])
                tokens[side] = result["tokens"]
                print(
                    f"{rows:>8,} {number + 1:>5} {side:>6} {result['seconds']:>7.1f} {result['cpu_s']:>7.1f} "
                    f"{result['tokens'] / result['seconds']:>10,.0f} {os.getloadavg()[0]:>5.1f}",
                    flush=True,
                )
        if len(set(tokens.values())) != 1:
            raise RuntimeError(f"the sides wrote different token counts: {tokens}")
        for side in sides:
            if side == "trl":
                continue
            for key, name in (("seconds", "wall"), ("cpu_s", "CPU")):
                ratios = [trl / ours for ours, trl in zip(figures[side][key], figures["trl"][key], strict=True)]
                print(
                    f"{rows:,} rows ({tokens['sftkit']:,} tokens): {side} (masked) / TRL (unmasked) speed by {name} "
                    f"time {statistics.median(ratios):.2f}× (median of {len(ratios)} rounds: "
                    f"{', '.join(f'{ratio:.2f}×' for ratio in ratios)})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
