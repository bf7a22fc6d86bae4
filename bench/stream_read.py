"""Streamed reading: speed, memory and cost of a resume, against the offline reader and `datasets` streaming.

    python bench/stream_read.py                        # 20k and 200k rows of JSONL, Parquet and CSV
    python bench/stream_read.py --rows 2000 --types jsonl    # smoke run

Data: synthetic conversations (a user question and an assistant answer of ~1 kB together), written
once per size and type to a temporary folder; Parquet in row groups of 10k rows, CSV as prompt/completion.
Each measurement runs in its own process, so that its peak RSS is its own:

  stream pass      `SourceStream`: one pass over every normalised row. Rows/s, peak RSS.
  offline read     `load_source` on a cold `datasets` cache (Arrow build + normalising map). Rows/s, peak RSS.
  stream resume    `SourceStream.load_state_dict` at the middle row, then its first row: seconds.
  datasets resume  `IterableDataset.load_state_dict` (`load_dataset(..., streaming=True)`) at the same row,
                   then its first row: seconds. The peer a user would otherwise reach for.

Memory flat in the source size shows as the same stream-pass peak RSS at both sizes; a resume that seeks
shows as a resume time flat in the size, where the peer's grows with the row it resumes at.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

SUFFIX = {"jsonl": "jsonl", "parquet": "parquet", "csv": "csv"}
BUILDER = {"jsonl": "json", "parquet": "parquet", "csv": "csv"}


def _parquet_schema():
    import pyarrow as pa

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("messages", pa.list_(turn))])


def make_rows(count: int):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "twelve",
        "plus",
        "thirty",
        "makes",
        "forty",
        "two",
    ]
    for i in range(count):
        question = " ".join(words[(i + k) % len(words)] for k in range(30))
        answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(140))
        yield f"Question {i}: {question}?", f"Answer {i}: {answer}."


def write_source(folder: Path, kind: str, count: int) -> Path:
    path = folder / f"rows-{count}.{SUFFIX[kind]}"
    if path.exists():
        return path
    if kind == "jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for question, answer in make_rows(count):
                handle.write(
                    json.dumps(
                        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                    )
                    + "\n"
                )
    elif kind == "csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "completion"])
            writer.writerows(make_rows(count))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = make_rows(count)
        with pq.ParquetWriter(path, schema := _parquet_schema()) as writer:
            while group := [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in islice(rows, 10_000)
            ]:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
    return path


def measure(what: str, path: str, cache: str) -> dict:
    """One measurement, in this (fresh) process."""
    import datasets

    datasets.disable_progress_bars()
    datasets.config.HF_DATASETS_CACHE = Path(cache)
    from sftkit.config import DatasetSpec
    from sftkit.data.formats import load_source
    from sftkit.data.stream import SourceStream

    spec = DatasetSpec(path=path)
    started = time.perf_counter()
    if what == "stream pass":
        stream = SourceStream(spec, "bench", None, False)
        rows = sum(1 for _ in stream)
    elif what == "offline read":
        rows = len(load_source(spec, None, False).dataset)
    elif what == "stream resume":
        first = SourceStream(spec, "bench", None, False)
        middle = sum(1 for _ in first) // 2
        first = SourceStream(spec, "bench", None, False)
        list(islice(iter(first), middle))
        state = json.loads(json.dumps(first.state_dict()))
        started = time.perf_counter()
        resumed = SourceStream(spec, "bench", None, False)
        resumed.load_state_dict(state)
        next(iter(resumed))
        rows = middle
    else:  # datasets resume
        builder = BUILDER[Path(path).suffix[1:]]
        stream = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
        middle = sum(1 for _ in stream) // 2
        list(islice(iter(stream), middle))
        state = json.loads(json.dumps(stream.state_dict()))
        started = time.perf_counter()
        stream = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
        stream.load_state_dict(state)
        next(iter(stream))
        rows = middle
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss, which Linux carries over from the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def run(what: str, path: Path, cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, __file__, "--measure", what, str(path), str(cache)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--types", nargs="+", default=["jsonl", "parquet", "csv"], choices=list(SUFFIX))
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory(prefix="sftkit-stream-bench-") as tmp:
        folder = Path(tmp)
        print(
            f"{'type':8} {'rows':>8} {'stream rows/s':>14} {'offline rows/s':>15} {'stream/offline':>15} "
            f"{'stream RSS':>11} {'offline RSS':>12} {'stream resume':>14} {'datasets resume':>16}"
        )
        for kind in args.types:
            for count in args.rows:
                path = write_source(folder, kind, count)
                figures = {
                    what: run(what, path, folder / f"cache-{kind}-{count}-{what.replace(' ', '_')}")
                    for what in ("stream pass", "offline read", "stream resume", "datasets resume")
                }
                stream, offline = figures["stream pass"], figures["offline read"]
                stream_speed = stream["rows"] / stream["seconds"]
                offline_speed = offline["rows"] / offline["seconds"]
                print(
                    f"{kind:8} {count:>8} {stream_speed:>14,.0f} {offline_speed:>15,.0f} "
                    f"{stream_speed / offline_speed:>14.2f}x {stream['peak_rss_mib']:>8.0f} MiB "
                    f"{offline['peak_rss_mib']:>8.0f} MiB {figures['stream resume']['seconds'] * 1000:>11.1f} ms "
                    f"{figures['datasets resume']['seconds'] * 1000:>13.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
