"""Score one model on prepared eval examples: the core `sftkit eval` runs once per model, and that a training
loop can call with the model and tokenizer it holds.

    scores = score_model(model, tokenizer, template, examples, ScoreSettings(parse_metrics(["extract:#### (\\S+)"])))
    scores.figures  # {"extract #### (\\S+)": 0.035}

Generation runs once for all generating metrics; `loss` runs one teacher-forced pass. `score_with` takes any
`Engine`: a model in memory (`TransformersEngine`, what `score_model` builds) or vLLM's (evaluate/vllm_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sftkit.evaluate.examples import EvalExample
from sftkit.evaluate.generation import Generation, ReferenceLoss, TransformersEngine
from sftkit.evaluate.interval import weighted_mean
from sftkit.evaluate.metrics import MetricSpec, score


@dataclass(frozen=True)
class ScoreSettings:
    metrics: list[MetricSpec]
    batch_size: int = 16
    max_new_tokens: int = 256
    max_length: int = 2048  # tokens a `loss` example may take; longer ones lose context on the left


@dataclass
class ModelScores:
    """Per metric label: each example's score, its weight in the figure, and the figure."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)
    generations: list[Generation] | None = None  # None when no metric generates
    truncated: int = 0  # `loss` examples cut on the left to fit max_length

    @property
    def figures(self) -> dict[str, float]:
        return {label: weighted_mean(self.scores[label], self.weights[label]) for label in self.scores}


class Engine(Protocol):
    """What scoring needs of a model: greedy replies and reference losses, in example order; `advance(n)` is
    told of each n examples done."""

    def generate(
        self, examples: Sequence[EvalExample], max_new_tokens: int, advance: Callable[[int], None] | None = None
    ) -> list[Generation]: ...

    def reference_losses(
        self, examples: Sequence[EvalExample], max_length: int, advance: Callable[[int], None] | None = None
    ) -> list[ReferenceLoss]: ...


def score_model(
    model: Any,
    tokenizer: Any,
    template: str,
    examples: Sequence[EvalExample],
    settings: ScoreSettings,
    advance: Callable[[int], None] | None = None,
) -> ModelScores:
    """Every metric of `settings` on every example, the model in memory generating in padded batches, with
    `template` rendering the prompts."""
    engine = TransformersEngine(model, tokenizer, template, settings.batch_size)
    return score_with(engine, examples, settings, advance)


def score_with(
    engine: Engine,
    examples: Sequence[EvalExample],
    settings: ScoreSettings,
    advance: Callable[[int], None] | None = None,
) -> ModelScores:
    """Every metric of `settings` on every example; `advance(n)` is told of each n examples done
    (`passes(settings)` passes over the examples in all)."""
    result = ModelScores()
    generating = [spec for spec in settings.metrics if spec.generates]
    if generating:
        result.generations = engine.generate(examples, settings.max_new_tokens, advance)
        for spec in generating:
            result.scores[spec.label] = [
                score(spec, generation.text, example.reference)
                for generation, example in zip(result.generations, examples, strict=True)
            ]
            result.weights[spec.label] = [1.0] * len(examples)
    if any(spec.name == "loss" for spec in settings.metrics):
        losses = engine.reference_losses(examples, settings.max_length, advance)
        result.scores["loss"] = [item.loss_sum / item.tokens if item.tokens else 0.0 for item in losses]
        result.weights["loss"] = [float(item.tokens) for item in losses]
        result.truncated = sum(item.truncated for item in losses)
    return _ordered(result, settings.metrics)


def passes(settings: ScoreSettings) -> int:
    """Passes over the examples `score_model` makes: one generation for all generating metrics, one for `loss`."""
    return any(spec.generates for spec in settings.metrics) + any(spec.name == "loss" for spec in settings.metrics)


def _ordered(result: ModelScores, metrics: list[MetricSpec]) -> ModelScores:
    """The metrics in the order they were named (generation fills its metrics first)."""
    labels = [spec.label for spec in metrics]
    result.scores = {label: result.scores[label] for label in labels}
    result.weights = {label: result.weights[label] for label in labels}
    return result
