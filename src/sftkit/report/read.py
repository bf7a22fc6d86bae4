"""Read a run directory as it is: finished, still running (a half-written last line), or crashed
(files missing). Whatever cannot be read becomes a note in the report instead of an error; only a
directory with no metrics at all is refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftkit.monitor.logged import SourceFacts, logged_findings
from sftkit.train.checkpoint import MANIFEST, checkpoint_dirs, step_of


@dataclass
class Checkpoint:
    name: str
    step: int
    complete: bool  # has its manifest (written last)


@dataclass
class RunRecord:
    run_dir: Path
    config: dict[str, Any]
    run: dict[str, Any]
    data_stats: dict[str, Any]
    train_rows: list[dict[str, Any]]  # one per logged step, sorted by step
    eval_rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    checkpoints: list[Checkpoint]
    notes: list[str] = field(default_factory=list)  # what was missing or unreadable
    evaluation: dict[str, Any] | None = None  # RUN_DIR/eval/summary.json, written by `sftkit eval`
    eval_predictions: list[dict[str, Any]] = field(default_factory=list)  # RUN_DIR/eval/predictions.jsonl

    @property
    def status(self) -> str:
        return self.run.get("status", "unknown")

    @property
    def last_step(self) -> int:
        steps = [row["step"] for row in self.train_rows + self.eval_rows]
        return self.run.get("last_step") or (max(steps) if steps else 0)


def read_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory; give the output_dir of a `sftkit train` run")
    notes: list[str] = []
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: has no metrics.jsonl, so it is not a run directory or the run has not "
            "started; give the output_dir of a `sftkit train` run"
        )
    metrics = _read_jsonl(metrics_path, notes)
    train_rows = _by_step([row for row in metrics if "loss" in row])
    eval_rows = _by_step([row for row in metrics if eval_loss_keys([row])])
    if not train_rows and not eval_rows:
        raise FileNotFoundError(
            f"{metrics_path}: no metric rows yet; the run logs one every `logging_steps` "
            "optimizer steps, so try again once it has logged"
        )
    config = _read_mapping(run_dir / "config.yaml", notes)
    run = _read_mapping(run_dir / "run.json", notes)
    data_stats = _read_mapping(run_dir / "data_stats.json", notes)
    findings = [
        {"kind": "?", "message": "", "advice": "", "evidence": {}, **row}
        for row in _read_jsonl(run_dir / "diagnosis.jsonl", notes, required=False)
    ]
    live_kinds = {finding["kind"] for finding in findings}
    findings += [
        asdict(finding)
        for finding in logged_findings(
            train_rows,
            eval_rows,
            float(config.get("max_grad_norm", 0) or 0),
            config.get("learning_rate"),
            _source_facts(run, data_stats),
        )
        if finding.kind not in live_kinds
    ]
    evaluation = _read_mapping(run_dir / "eval" / "summary.json", []) or None
    return RunRecord(
        run_dir=run_dir,
        config=config,
        run=run,
        data_stats=data_stats,
        train_rows=train_rows,
        eval_rows=eval_rows,
        samples=[
            {"prompt": "", "completion": "", "ended": False, **row}
            for row in _read_jsonl(run_dir / "samples.jsonl", notes, required=False)
        ],
        findings=findings,
        checkpoints=[
            Checkpoint(path.name, step_of(path), (path / MANIFEST).is_file()) for path in checkpoint_dirs(run_dir)
        ],
        notes=notes,
        evaluation=evaluation,
        eval_predictions=_read_jsonl(run_dir / "eval" / "predictions.jsonl", notes, required=False, key="row")
        if evaluation
        else [],
    )


def _source_facts(run: dict[str, Any], data_stats: dict[str, Any]) -> list[SourceFacts]:
    """Each training source's name (run.json) and how often the mixture repeats it (data_stats.json's `rate`)."""
    names, stats = run.get("sources"), data_stats.get("sources")
    if not isinstance(names, list) or not isinstance(stats, list) or len(names) != len(stats):
        return []
    return [
        SourceFacts(str(name), float(stat.get("rate") or 1.0))
        for name, stat in zip(names, stats, strict=True)
        if isinstance(stat, dict)
    ]


def eval_loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The eval loss keys logged in `rows`, in first-seen order: `eval_loss` for one unnamed eval set,
    `eval_<name>_loss` for each named one."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((key, None) for key in row if key.startswith("eval_") and key.endswith("_loss"))
    return list(keys)


def _read_mapping(path: Path, notes: list[str]) -> dict[str, Any]:
    """config.yaml / run.json / data_stats.json (JSON is YAML); {} with a note when missing or broken."""
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        notes.append(f"{path.name} could not be read ({type(err).__name__}); is the run writing it right now?")
        return {}
    return value if isinstance(value, dict) else {}


def _read_jsonl(path: Path, notes: list[str], required: bool = True, key: str = "step") -> list[dict[str, Any]]:
    if not path.is_file():
        if required:
            notes.append(f"{path.name} is missing")
        return []
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict) and isinstance(row.get(key), int):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        notes.append(
            f"{path.name}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}); "
            "a line cut short by a crash or a run still writing"
        )
    return rows


def _by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row logged for each step (a resumed run logs steps after its checkpoint again)."""
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])
