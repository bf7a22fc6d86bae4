"""Soak test: kill -9 a tiny training run at random moments, resume it, and compare with a run never killed.

Each round starts `sftkit train` (through tests/run_train.py) on a tiny random Llama, kills it with
SIGKILL one or more times — after a random step plus a random delay, or the moment a
`.tmp-checkpoint-*` directory appears (mid-save) — resumes with `--resume_from_checkpoint true`
until the run finishes, then prints where it was killed, which checkpoint each resume took, and
the largest difference between its final adapter weights and those of the uninterrupted run.

    python bench/soak_kill_resume.py                     # 4 rounds, seed 0
    python bench/soak_kill_resume.py --rounds 20 --seed 3 --max-steps 12

Exit status 1 if any round ends with a weight difference above 1e-6, resumes from a half-written
checkpoint, loses more than save_steps steps, or leaves a `.tmp-checkpoint-*` behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from tests.train_helpers import final_weights, max_weight_difference, tiny_config, write_chat_data  # noqa: E402

RUNNER = REPO / "tests" / "run_train.py"
TOLERANCE = 1e-6


def last_logged_step(output_dir: Path, since: float = 0.0) -> int:
    """The newest step in metrics.jsonl, 0 if the file was last written before `since` (an earlier attempt's rows)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists() or path.stat().st_mtime < since:
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")), default=0)


def saving_since(output_dir: Path, since: float) -> bool:
    """A `.tmp-checkpoint-*` created by this attempt exists (not one an earlier kill left behind)."""
    for path in output_dir.glob(".tmp-checkpoint-*"):
        try:
            if path.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # renamed into place while we looked
            pass
    return False


def complete_checkpoints(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if (p / "manifest.json").exists())


def start(config_path: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(RUNNER), str(config_path)] + (["--resume_from_checkpoint", "true"] if resume else [])
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def resumed_from(stdout: str) -> int:
    match = re.search(r"Resumed from \S+ at step (\d+)", stdout)
    return int(match.group(1)) if match else 0


def kill_at_random_moment(
    process: subprocess.Popen, output_dir: Path, rng: random.Random, max_steps: int, first_step: int
) -> dict | None:
    """SIGKILL at a random moment of this attempt; None if the run finished first."""
    started = time.time()
    if rng.random() < 0.35:
        kind, target, delay = "mid-save", None, 0.0
    else:
        kind, target, delay = (
            "after step",
            rng.randint(min(first_step + 1, max_steps), max_steps),
            rng.uniform(0.0, 1.5),
        )
    while process.poll() is None:
        if kind == "mid-save" and saving_since(output_dir, started):
            break
        if kind == "after step" and last_logged_step(output_dir, since=started) >= target:
            time.sleep(delay)
            break
        time.sleep(0.005)
    if process.poll() is not None:
        return None
    seen = {
        "kind": kind if kind == "mid-save" else f"after step {target} + {delay:.2f}s",
        "last_step": last_logged_step(output_dir),
        "temp": [p.name for p in output_dir.glob(".tmp-checkpoint-*")],
    }
    process.send_signal(signal.SIGKILL)
    seen["stdout"], seen["stderr"] = process.communicate()
    seen["checkpoints"] = complete_checkpoints(output_dir)
    return seen


def run_round(
    number: int, config_path: Path, output_dir: Path, rng: random.Random, settings: dict, straight: dict, kills: int
) -> bool:
    """Kill `kills` times (fewer if the run finishes first), then let the last attempt finish."""
    problems, lines, expected_resume = [], [], None
    for attempt in range(kills + 1):
        process = start(config_path, resume=attempt > 0)
        seen = (
            kill_at_random_moment(process, output_dir, rng, settings["max_steps"], expected_resume or 0)
            if attempt < kills
            else None
        )
        stdout, stderr = (seen["stdout"], seen["stderr"]) if seen else process.communicate()
        if seen is None and process.returncode != 0:
            print(f"round {number}: run failed (rc {process.returncode})\n{stderr[-2000:]}")
            return False
        if attempt > 0 and "Resumed from" in stdout and resumed_from(stdout) != expected_resume:
            problems.append(
                f"resumed from step {resumed_from(stdout)}, not the newest complete checkpoint {expected_resume}"
            )
        if seen is None:
            lines.append(f"finished (resumed from step {resumed_from(stdout)})" if attempt else "finished unkilled")
            break
        expected_resume = max(seen["checkpoints"], default=0)
        if seen["last_step"] - expected_resume > settings["save_steps"]:
            problems.append(f"lost {seen['last_step'] - expected_resume} steps > save_steps {settings['save_steps']}")
        lines.append(
            f"killed {seen['kind']} at step {seen['last_step']} (complete {seen['checkpoints']}, "
            f"half-written {seen['temp']})"
        )
    difference = max_weight_difference(straight, final_weights(output_dir))
    leftovers = [p.name for p in output_dir.glob(".tmp-checkpoint-*")]
    if leftovers:
        problems.append(f"left {leftovers}")
    if difference > TOLERANCE:
        problems.append(f"weights differ by {difference:.2e}")
    print(
        f"round {number}: "
        + "; ".join(lines)
        + f" → max weight difference {difference:.2e}"
        + ("  PROBLEMS: " + "; ".join(problems) if problems else "")
    )
    return not problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--max-kills", type=int, default=2, help="SIGKILLs per round (1 to this many)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sftkit-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    model_dir = workdir / "tiny_llama"
    if not (model_dir / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(workdir / "tiny_tokenizer"))
        tokenizer.save_pretrained(model_dir)
        build_tiny_llama(model_dir, vocab_size=len(tokenizer))
    data = write_chat_data(workdir / "chat.jsonl")
    settings = dict(
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        packing=True,
        gradient_accumulation_steps=2,
        lora_dropout=0.1,
    )

    def config_file(name: str) -> tuple[Path, Path]:
        output_dir = workdir / name
        config = tiny_config(model_dir, data, output_dir, **settings)
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
        return path, output_dir

    print(f"work dir {workdir}; {args.rounds} rounds, max_steps {args.max_steps}, save_steps {args.save_steps}")
    path, straight_dir = config_file("straight")
    if not (straight_dir / "adapter").exists():
        baseline = start(path, resume=False)
        _, err = baseline.communicate()
        if baseline.returncode != 0:
            sys.exit(f"uninterrupted run failed:\n{err[-2000:]}")
    straight = final_weights(straight_dir)

    failures = 0
    for number in range(1, args.rounds + 1):
        path, output_dir = config_file(f"round-{number}")
        shutil.rmtree(output_dir, ignore_errors=True)
        kills = rng.randint(1, args.max_kills)
        failures += not run_round(number, path, output_dir, rng, settings, straight, kills)
    print(f"{args.rounds - failures}/{args.rounds} rounds ended equal to the uninterrupted run (≤ {TOLERANCE:g})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
