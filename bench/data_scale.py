"""Data at scale: tokenization speed and host memory of sftkit vs TRL's SFTTrainer as rows grow.

    python bench/data_scale.py                         # 20k, 100k, 200k rows (about an hour on 2 cores)
    python bench/data_scale.py --rows 2000 20000       # small vs 10×
    python bench/data_scale.py --rows 2000 --no-ddp    # smoke run, without the 2-process runs
    python bench/data_scale.py --rows 20000 200000 --ddp-only   # 2 processes vs 1 at two sizes

Data: ultrachat-shaped conversations, each 5 user/assistant exchanges drawn (seeded) from GSM8K
train, ~1,000 Llama-2 tokens each, written once per size as JSONL `messages` rows. Both tools read
that file with the Llama-2 tokenizer and sftkit's `llama2` chat template, max_seq_length 2048,
packing (sftkit: balanced best-fit; TRL: `packing_strategy="bfd"`), the same number of map
processes, a fresh `datasets` cache per tool and size. Each measurement is its own process:

  sftkit tokenize   `sftkit data inspect --json` on a cold cache: read, tokenize + mask, pack.
                    Its `tokenize` stage time and tokens/s, and the run's peak RSS.
  sftkit train      `sftkit train --max_steps 2` (tokenization cached), tiny random Llama 2 × 64.
  TRL tokenize      `SFTTrainer(...)` construction on a cold cache (tokenize + pack; TRL does
                    no assistant-only masking here, as its `assistant_only_loss` needs a template
                    with generation markers); wall time and tokens/s, and peak RSS.
  TRL train         construction (cached) + `trainer.train()` for 2 steps.
  2 processes       at the first size only (every size with --ddp-only): `sftkit train` with 2 gloo
                    processes against 1, same config and warm cache, started by torchrun (each
                    process afresh) and by `sftkit train --nproc_per_node` (forked after the imports;
                    1 process is then a plain `sftkit train`, without a launcher process).

Peak memory is sampled every 0.25 s over the whole process tree (map workers included): the peak
of the summed RSS, and of the summed PSS, which counts a page shared by N processes (the memory-
mapped Arrow files, the libraries) as 1/N in each, so it is what the tree really costs the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
TURNS = 5


# --------------------------------------------------------------------------- data and configs


def write_conversations(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` conversations of TURNS GSM8K exchanges each (drawn with replacement, seeded)."""
    exchanges = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            messages = []
            for exchange in rng.choices(exchanges, k=TURNS):
                messages += [
                    {"role": "user", "content": exchange["question"]},
                    {"role": "assistant", "content": exchange["answer"]},
                ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def sftkit_config(model: Path, data: Path, output_dir: Path, num_proc: int) -> dict:
    return {
        "model_name_or_path": str(model),
        "chat_template": "llama2",
        "datasets": [{"path": str(data)}],
        "max_seq_length": 2048,
        "packing": True,
        "dataset_num_proc": num_proc,
        "finetuning": "full",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_steps": 10**9,
        "sample_steps": 10**9,
        "report_to": "none",
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
    }


# --------------------------------------------------------------------------- measuring a process tree


class TreeMemory:
    """Peak summed RSS and PSS of a process and all its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {"peak_rss_gib": self.peak_rss / 2**30, "peak_pss_gib": self.peak_pss / 2**30}


def measure(command: list[str], env: dict, log: Path, timeout: float = 7200, output: str = "") -> dict:
    """Run a command as its own process tree: its wall time, peak memory, and what it printed as JSON
    (`output="json"`: all of stdout; `"result"`: the line starting with RESULT)."""
    started = time.perf_counter()
    with log.open("w") as errors:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        memory = TreeMemory(proc.pid)
        stdout, _ = proc.communicate(timeout=timeout)
        figures = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} … failed ({proc.returncode}); see {log}")
    result = {}
    if output == "json":
        result = json.loads(stdout)
    elif output == "result":
        result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**figures, "wall_s": time.perf_counter() - started, **result}


# --------------------------------------------------------------------------- workers


def trl_worker(args: argparse.Namespace) -> None:
    """TRL SFTTrainer on the same file: prep (tokenize + bfd pack) timed; optionally 2 training steps."""
    import datasets
    import pyarrow.compute as pc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftkit.data.template import resolve_chat_template

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = resolve_chat_template("llama2", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    rows = datasets.load_dataset("json", data_files=str(args.data), split="train")
    config = SFTConfig(
        output_dir=str(args.output_dir),
        max_length=2048,
        packing=True,
        packing_strategy="bfd",
        dataset_num_proc=args.num_proc,
        per_device_train_batch_size=1,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        learning_rate=1e-4,
    )
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    prep_s = time.perf_counter() - started
    ids = trainer.train_dataset.with_format("arrow")[:]["input_ids"]
    tokens = int(pc.sum(pc.list_value_length(ids)).as_py())
    if args.train:
        trainer.train()
    print("RESULT " + json.dumps({"tokenize_s": prep_s, "tokens": tokens, "tokens_per_s": tokens / prep_s}))


def sftkit_inspect_figures(stdout_json: dict) -> dict:
    timings = stdout_json.get("timings", {})
    return {
        "tokenize_s": timings.get("seconds", {}).get("tokenize"),
        "read_s": timings.get("seconds", {}).get("read"),
        "pack_s": timings.get("seconds", {}).get("pack"),
        "tokens": timings.get("tokenized_tokens"),
        "tokens_per_s": timings.get("tokens_per_s"),
        "examples": stdout_json.get("train_examples"),
        "packs": stdout_json.get("packed_sequences"),
    }


# --------------------------------------------------------------------------- one size


def run_size(
    rows: int,
    workdir: Path,
    model: Path,
    num_proc: int,
    with_ddp: bool,
    with_tools: bool,
    results: dict,
    keep_caches: bool = False,
) -> None:
    """One size's measurements; the `datasets` caches (GBs at 200k rows) are removed after them unless kept."""
    try:
        _measure_size(rows, workdir, model, num_proc, with_ddp, with_tools, results)
    finally:
        if not keep_caches:
            for cache in workdir.glob(f"cache-*-{rows}"):
                shutil.rmtree(cache, ignore_errors=True)


def _measure_size(
    rows: int, workdir: Path, model: Path, num_proc: int, with_ddp: bool, with_tools: bool, results: dict
) -> None:
    import yaml

    data = workdir / f"chat-{rows}.jsonl"
    if not data.exists():
        write_conversations(data, rows)
    python = sys.executable
    base_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    row: dict = {"rows": rows}
    results["sizes"].append(row)

    def cache_env(tool: str, fresh: bool = True) -> dict:
        cache = workdir / f"cache-{tool}-{rows}"
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        return {**base_env, "HF_DATASETS_CACHE": str(cache)}

    # sftkit: data inspect on a cold cache, then 2 training steps on the warm one.
    env = cache_env("sftkit", fresh=with_tools)
    config = workdir / f"sftkit-{rows}.yaml"
    config.write_text(yaml.safe_dump(sftkit_config(model, data, workdir / f"run-{rows}", num_proc)))
    inspect = [python, "-m", "sftkit.cli", "data", "inspect", str(config), "--json"]
    if with_tools:
        inspected = measure(inspect, env, workdir / f"sftkit-inspect-{rows}.log", output="json")
        row["sftkit_inspect"] = {k: inspected[k] for k in ("peak_rss_gib", "peak_pss_gib", "wall_s")}
        row["sftkit_inspect"].update(sftkit_inspect_figures(inspected))
        report(results)
        trained = measure([python, "-m", "sftkit.cli", "train", str(config)], env, workdir / f"sftkit-train-{rows}.log")
        row["sftkit_train"] = {k: trained[k] for k in ("peak_rss_gib", "peak_pss_gib", "wall_s")}
        report(results)
    if with_ddp:
        if not with_tools:  # tokenize first, so that no run below measures tokenizing
            subprocess.run(inspect, env=env, check=True, capture_output=True)
        launchers = {
            "torchrun": lambda n: [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                "-m",
                "sftkit.cli",
                "train",
                str(config),
            ],
            "nproc_per_node": lambda n: [python, "-m", "sftkit.cli", "train", str(config), "--nproc_per_node", str(n)],
        }
        for name, command in launchers.items():
            for procs in (2, 1):
                measured = measure(command(procs), env, workdir / f"sftkit-{name}{procs}-{rows}.log")
                row[f"{name}_{procs}"] = {k: measured[k] for k in ("peak_rss_gib", "peak_pss_gib", "wall_s")}
            report(results)
    if not with_tools:
        return

    # TRL: construction on a cold cache (tokenize + pack), then construction (cached) + 2 steps.
    env = cache_env("trl")
    worker = [
        python,
        __file__,
        "--trl-worker",
        "--model",
        str(model),
        "--data",
        str(data),
        "--num-proc",
        str(num_proc),
        "--output-dir",
        str(workdir / f"trl-{rows}"),
    ]
    prepared = measure(worker, env, workdir / f"trl-prep-{rows}.log", output="result")
    row["trl_prep"] = prepared
    report(results)
    row["trl_train"] = {
        k: v
        for k, v in measure([*worker, "--train"], env, workdir / f"trl-train-{rows}.log").items()
        if k in ("peak_rss_gib", "peak_pss_gib", "wall_s")
    }
    report(results)


# --------------------------------------------------------------------------- report


def report(results: dict) -> None:
    """Rewrite the JSON and print the table so far (a run cut short still leaves its figures)."""
    Path(results["json"]).write_text(json.dumps(results, indent=2))
    lines = [
        "| rows | tokens | tool | tokenize s | tokens/s | inspect/prep peak RSS (PSS) GiB | "
        "2-step train peak RSS (PSS) GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["sizes"]:
        s, t = row.get("sftkit_inspect"), row.get("trl_prep")
        train_s, train_t = row.get("sftkit_train"), row.get("trl_train")

        def mem(m: dict | None) -> str:
            return f"{m['peak_rss_gib']:.2f} ({m['peak_pss_gib']:.2f})" if m else "–"

        if s:
            lines.append(
                f"| {row['rows']:,} | {s['tokens']:,} | sftkit | {s['tokenize_s']:.1f} | "
                f"{s['tokens_per_s']:,.0f} | {mem(s)} | {mem(train_s)} |"
            )
        if t:
            lines.append(
                f"| {row['rows']:,} | {t['tokens']:,} | TRL {results['trl_version']} | {t['tokenize_s']:.1f} | "
                f"{t['tokens_per_s']:,.0f} | {mem(t)} | {mem(train_t)} |"
            )
    for row in results["sizes"]:
        for name in ("torchrun", "nproc_per_node"):
            if f"{name}_1" in row and f"{name}_2" in row:
                one, two = row[f"{name}_1"], row[f"{name}_2"]
                lines.append(
                    f"2 processes vs 1 ({name}, gloo, {row['rows']:,} rows): summed RSS "
                    f"{two['peak_rss_gib']:.2f} vs {one['peak_rss_gib']:.2f} GiB "
                    f"({two['peak_rss_gib'] / one['peak_rss_gib']:.2f}×), summed PSS "
                    f"{two['peak_pss_gib']:.2f} vs {one['peak_pss_gib']:.2f} GiB "
                    f"({two['peak_pss_gib'] / one['peak_pss_gib']:.2f}×)"
                )
    sizes = [r for r in results["sizes"] if "sftkit_train" in r]
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        for key, name in (("sftkit_inspect", "inspect"), ("sftkit_train", "train")):
            lines.append(
                f"sftkit {name} peak RSS {last['rows']:,} rows / {first['rows']:,} rows: "
                f"{last[key]['peak_rss_gib'] / first[key]['peak_rss_gib']:.2f}×"
            )
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, caches and logs here")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process vs 1-process runs")
    parser.add_argument(
        "--ddp-only", action="store_true", help="only the 2-process vs 1-process runs, at every size given (cache kept)"
    )
    parser.add_argument("--keep-caches", action="store_true", help="keep each size's tokenized caches")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import trl

    sys.path.insert(0, str(ROOT / "bench"))
    from make_tiny_llama import make_tiny_llama

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sftkit-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "tiny-llama"
    if not model.exists():
        make_tiny_llama(model, layers=2, hidden=64)
    results = {
        "json": str(workdir / "data_scale.json"),
        "trl_version": trl.__version__,
        "num_proc": args.num_proc,
        "cpus": os.cpu_count(),
        "sizes": [],
    }
    print(f"workdir {workdir}; {args.num_proc} map processes; rows {args.rows}", flush=True)
    for index, rows in enumerate(args.rows):
        run_size(
            rows,
            workdir,
            model,
            args.num_proc,
            with_ddp=args.ddp_only or (index == 0 and not args.no_ddp),
            with_tools=not args.ddp_only,
            results=results,
            keep_caches=args.keep_caches,
        )


if __name__ == "__main__":
    main()
