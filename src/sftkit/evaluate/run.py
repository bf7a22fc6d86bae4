"""`sftkit eval`: score a trained model (and its base, with `base=True`) on a data file, and say whether the
difference is more than noise.

What it reads and writes:

    MODEL        a run directory, an adapter or model folder (as `sftkit generate`), or a GGUF file
    OUT/summary.json       base and tuned figures, difference and its 95% interval, per metric
    OUT/predictions.jsonl  one row per example: prompt, reference, each model's prediction and scores

The tuned model's saved template renders the prompts of both models, so the base is asked exactly what the
tuned model is. Models are loaded one after the other, so memory holds one. Time is one generation pass (or one
forward pass for `loss`) per model. `engine` picks what generates: transformers (padded batches, any device) or
vLLM's offline engine on a GPU where the `vllm` extra is installed (evaluate/vllm_engine.py); the scores, the
files and the table are the same either way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sftkit.data.template import require_chat_template, resolve_chat_template
from sftkit.evaluate.examples import EvalExample, load_eval_examples
from sftkit.evaluate.generation import TransformersEngine
from sftkit.evaluate.interval import paired_bootstrap
from sftkit.evaluate.metrics import MetricSpec
from sftkit.evaluate.score import Engine, ModelScores, ScoreSettings, passes, score_with
from sftkit.generate import load_trained, resolve_weights
from sftkit.model.load import ModelError, load_model, load_model_config, load_tokenizer

SUMMARY, PREDICTIONS = "summary.json", "predictions.jsonl"
ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class EvalOptions:
    model: str
    data: str
    metrics: list[MetricSpec]
    base: bool = False
    base_model: str | None = None  # overrides the base the model names (adapter_config / the run's config)
    out: Path | None = None  # default: MODEL/eval for a run directory, nothing written otherwise
    limit: int | None = None
    data_format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    max_new_tokens: int = 256
    max_length: int = 2048  # tokens a `loss` example may take
    engine: str = "transformers"  # or "vllm": what generates (and scores `loss`)


@dataclass
class MetricResult:
    metric: str
    higher_is_better: bool
    tuned: float
    base: float | None = None
    difference: float | None = None
    interval: tuple[float, float] | None = None  # 95%, paired bootstrap over examples
    wins: int | None = None  # examples where tuned scores better than base
    losses: int | None = None


@dataclass
class EvalResult:
    model: str
    base_model: str | None
    data: str
    examples: int
    metrics: list[MetricResult]
    seconds: dict[str, float]
    ended: dict[str, float]  # share of generations that emitted the end-of-turn, per model
    truncated: int = 0
    engine: str = "transformers"
    out: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # predictions.jsonl

    def summary(self) -> dict[str, Any]:
        summary = asdict(self)
        summary.pop("rows")
        return summary


class _Models(Protocol):
    """Where the engines of one evaluation come from: the tuned model first, then its base."""

    def tuned(self, name: str) -> tuple[Engine, Any, str]: ...  # (engine, tokenizer, template)

    def base(self, name: str, tokenizer: Any, template: str) -> Engine: ...


def evaluate(options: EvalOptions) -> EvalResult:
    """Score MODEL (and its base) on the data; write summary.json and predictions.jsonl to the out folder."""
    if options.engine not in ENGINES:
        raise ModelError(f"--engine {options.engine}: unknown engine; choose one of {', '.join(ENGINES)}")
    settings = ScoreSettings(options.metrics, options.batch_size, options.max_new_tokens, options.max_length)
    examples = load_eval_examples(options.data, options.data_format, options.columns, options.limit)
    out = options.out if options.out is not None else _default_out(Path(options.model))
    base_name = options.base_model or _base_name(options.model)
    if options.base and not base_name:
        raise ModelError(
            f"--base: {options.model} does not name the base model it was trained from; give it with --base-model NAME"
        )
    if options.base:
        assert base_name is not None
        _check_base(base_name)  # before the tuned model's minutes of generation, not after
    scored, seconds = {}, {}
    with ExitStack() as stack, _progress_bar(len(examples) * passes(settings)) as bar:
        models = _models(options.engine, options.batch_size, stack)
        started = time.perf_counter()
        engine, tokenizer, template = models.tuned(options.model)
        require_chat_template(template, examples[0].format, f"--data {options.data}", tokenizer)
        scored["tuned"] = score_with(engine, examples, settings, bar("tuned"))
        seconds["tuned"] = time.perf_counter() - started
        del engine  # one model in memory at a time
        if options.base:
            assert base_name is not None
            started = time.perf_counter()
            scored["base"] = score_with(models.base(base_name, tokenizer, template), examples, settings, bar("base"))
            seconds["base"] = time.perf_counter() - started
    result = _compare(options, base_name if options.base else None, examples, scored, seconds)
    if out is not None:
        write_result(result, out)
    return result


def _models(engine: str, batch_size: int, stack: ExitStack) -> _Models:
    if engine == "vllm":
        from sftkit.evaluate.vllm_engine import VLLMModels

        return VLLMModels(stack)
    return _TransformersModels(batch_size)


@contextmanager
def _progress_bar(per_model: int) -> Iterator[Callable[[str], Callable[[int], None]]]:
    """A bar per model on stderr (examples scored, every pass counted); `bar(name)` gives its advance."""
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:

        def bar(name: str) -> Callable[[int], None]:
            task = progress.add_task(name, total=per_model)
            return lambda done: progress.advance(task, done)

        yield bar


def _default_out(model: Path) -> Path | None:
    return model / "eval" if (model / "metrics.jsonl").is_file() else None


def _device_and_dtype() -> tuple[torch.device, torch.dtype | None]:
    """The GPU in bf16 where there is one; else the CPU in the weights' own dtype."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.device("cpu"), None


@dataclass(frozen=True)
class _TransformersModels:
    """Each model loaded into memory (the GPU in bf16 where there is one), generating in padded batches."""

    batch_size: int

    def tuned(self, name: str) -> tuple[Engine, Any, str]:
        """A run directory, adapter or model folder (with its saved template), or a GGUF file (its own template)."""
        device, dtype = _device_and_dtype()
        if name.endswith(".gguf"):
            tokenizer = load_tokenizer(name)
            model = load_model(name, dtype or torch.float32, vocab_size=len(tokenizer)).to(device)
            template = resolve_chat_template(None, tokenizer)
        else:
            model, tokenizer, template = load_trained(resolve_weights(Path(name)), dtype)
            model.to(device)
        return TransformersEngine(model, tokenizer, template, self.batch_size), tokenizer, template

    def base(self, name: str, tokenizer: Any, template: str) -> Engine:
        device, dtype = _device_and_dtype()
        model = load_model(name, dtype or torch.float32, vocab_size=len(tokenizer)).to(device)
        return TransformersEngine(model, tokenizer, template, self.batch_size)


def _base_name(name: str) -> str | None:
    """The base a model was trained from, when it names one (a GGUF file names none)."""
    return None if name.endswith(".gguf") else _base_of(resolve_weights(Path(name)))


def _base_of(folder: Path) -> str | None:
    """The base an adapter names, or for a run's full fine-tune, the run config's model."""
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        return json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    run_config = folder.parent / "config.yaml"
    if run_config.is_file():
        config = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        name, gguf = config.get("model_name_or_path"), config.get("gguf_file")
        return f"{name.rstrip('/')}/{gguf}" if name and gguf else name
    return None


def _check_base(name: str) -> None:
    try:
        load_model_config(name)
    except ModelError as err:
        raise ModelError(
            f"--base: the base model {name!r} cannot be loaded ({err}); give it with --base-model NAME"
        ) from None


def _compare(
    options: EvalOptions,
    base_name: str | None,
    examples: list[EvalExample],
    scored: dict[str, ModelScores],
    seconds: dict[str, float],
) -> EvalResult:
    tuned, base = scored["tuned"], scored.get("base")
    metrics = []
    for spec in options.metrics:
        label, sign = spec.label, 1 if spec.higher_is_better else -1
        row = MetricResult(label, spec.higher_is_better, tuned.figures[label])
        if base is not None:
            row.base = base.figures[label]
            row.difference = row.tuned - row.base
            row.interval = paired_bootstrap(base.scores[label], tuned.scores[label], tuned.weights[label])
            pairs = list(zip(base.scores[label], tuned.scores[label], strict=True))
            row.wins = sum(sign * (t - b) > 0 for b, t in pairs)
            row.losses = sum(sign * (t - b) < 0 for b, t in pairs)
        metrics.append(row)
    ended = {
        name: sum(g.ended for g in model.generations) / len(model.generations)
        for name, model in scored.items()
        if model.generations
    }
    return EvalResult(
        model=options.model,
        base_model=base_name,
        data=options.data,
        examples=len(examples),
        metrics=metrics,
        seconds={name: round(value, 2) for name, value in seconds.items()},
        ended=ended,
        truncated=tuned.truncated,
        engine=options.engine,
        rows=[_row(index, example, scored) for index, example in enumerate(examples)],
    )


def _row(index: int, example: EvalExample, scored: dict[str, ModelScores]) -> dict[str, Any]:
    row: dict[str, Any] = {"row": example.row, "prompt": example.question, "reference": example.reference}
    for name, model in scored.items():
        entry: dict[str, Any] = {"scores": {label: values[index] for label, values in model.scores.items()}}
        if model.generations is not None:
            entry = {"prediction": model.generations[index].text, "ended": model.generations[index].ended, **entry}
        row[name] = entry
    return row


def write_result(result: EvalResult, out: Path) -> None:
    """OUT/summary.json and OUT/predictions.jsonl, each written whole then renamed (a reader never sees half)."""
    out.mkdir(parents=True, exist_ok=True)
    result.out = str(out)
    for name, text in (
        (SUMMARY, json.dumps(result.summary(), indent=2) + "\n"),
        (PREDICTIONS, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)),
    ):
        partial = out / f".{name}.tmp"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, out / name)
