"""`sftkit eval`: did fine-tuning help on my task, and what did it cost elsewhere.

examples.py    a data file's rows as (prompt, reference) pairs, in every training format
metrics.py     metric names → MetricSpec, and one score per example (exact, extract, contains, rouge, bleu, chrf, loss)
generation.py  batched greedy generation (left padding, KV cache) and teacher-forced reference loss
score.py       score_model: one model already in memory, every metric (what a training loop calls)
interval.py    the paired bootstrap interval of a base-vs-tuned difference
run.py         evaluate: load the tuned model and its base, score both, write summary.json and predictions.jsonl
"""

from sftkit.evaluate.examples import EvalExample, load_eval_examples
from sftkit.evaluate.metrics import MetricSpec, parse_metric, parse_metrics
from sftkit.evaluate.run import EvalOptions, EvalResult, MetricResult, evaluate
from sftkit.evaluate.score import ModelScores, ScoreSettings, score_model

__all__ = [
    "EvalExample",
    "EvalOptions",
    "EvalResult",
    "MetricResult",
    "MetricSpec",
    "ModelScores",
    "ScoreSettings",
    "evaluate",
    "load_eval_examples",
    "parse_metric",
    "parse_metrics",
    "score_model",
]
