"""Score one model in memory on prepared eval examples: the core `sftkit eval` runs once per model, and
that a training loop can call with the model and tokenizer it holds.

    scores = score_model(model, tokenizer, template, examples, ScoreSettings(parse_metrics(["extract:#### (\\S+)"])))
    scores.figures  # {"extract #### (\\S+)": 0.035}

Generation runs once for all generating metrics; `loss` runs one teacher-forced forward per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftkit.evaluate.examples import EvalExample
from sftkit.evaluate.generation import Generation, generate_batched, reference_losses
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


def score_model(
    model: Any,
    tokenizer: Any,
    template: str,
    examples: Sequence[EvalExample],
    settings: ScoreSettings,
    advance: Callable[[int], None] | None = None,
) -> ModelScores:
    """Every metric of `settings` on every example, with `template` rendering the prompts; `advance(n)` is told
    of each batch done (n examples; `passes(settings)` passes over the examples in all)."""
    result = ModelScores()
    generating = [spec for spec in settings.metrics if spec.generates]
    if generating:
        result.generations = generate_batched(
            model, tokenizer, template, examples, settings.max_new_tokens, settings.batch_size, advance
        )
        for spec in generating:
            result.scores[spec.label] = [
                score(spec, generation.text, example.reference)
                for generation, example in zip(result.generations, examples, strict=True)
            ]
            result.weights[spec.label] = [1.0] * len(examples)
    if any(spec.name == "loss" for spec in settings.metrics):
        losses = reference_losses(
            model, tokenizer, template, examples, settings.batch_size, settings.max_length, advance
        )
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
