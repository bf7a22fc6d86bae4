"""Task metrics: what a prediction scores against its reference, one number per example.

A metric is named by a short string, in the CLI (`--metric extract --extract '#### (\\S+)'`) or a config
(`extract:#### (\\S+)`), and parsed once into a `MetricSpec` that fails fast on a bad name or regex:

    exact      1 when prediction and reference match after normalisation (case, spaces, numbers)
    extract    1 when the regex's group matches in both (numbers normalised: `1,000` = `1000`, `5.0` = `5`)
    contains   1 when the normalised reference occurs in the normalised prediction
    rouge      ROUGE-L F1 (rouge-score), 0..100
    bleu       sentence BLEU (sacrebleu), 0..100
    chrf       sentence chrF (sacrebleu), 0..100
    loss       mean loss per reference token (teacher-forced, no generation); lower is better

Every metric but `loss` scores a generated text; a run's figure is the mean over examples (for `loss`, the
mean over all reference tokens). Scoring is linear in examples and prediction length.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftkit.config import GENERATED_METRICS, ConfigError

METRICS = (*GENERATED_METRICS, "loss")
LIBRARY_METRICS = {
    "rouge": ("rouge_score", "rouge-score"),
    "bleu": ("sacrebleu", "sacrebleu"),
    "chrf": ("sacrebleu", "sacrebleu"),
}
_NUMBER = re.compile(r"^[-+]?[$€£]?\d[\d,]*(\.\d+)?%?$")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name and, for `extract`, the regex whose first group is the answer."""

    name: str
    pattern: str | None = None

    @property
    def generates(self) -> bool:
        """Whether the metric scores generated text (all but `loss`)."""
        return self.name != "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.name != "loss"

    @property
    def label(self) -> str:
        return f"extract {self.pattern}" if self.name == "extract" else self.name


def parse_metric(text: str, extract: str | None = None) -> MetricSpec:
    """`exact`, `extract:REGEX` (or `extract` with `extract` given apart, as the CLI's --extract), ...

    Raises ConfigError naming the metric and the fix: an unknown name (with a did-you-mean), an extract
    regex that is missing, does not compile or has no group, a library metric whose library is absent.
    """
    name, _, inline = text.partition(":")
    name = name.strip().lower()
    if name not in METRICS:
        close = difflib.get_close_matches(name, METRICS, n=1)
        raise ConfigError(
            f"metric {text!r}: unknown; use one of {', '.join(METRICS)}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    if name != "extract":
        if inline:
            raise ConfigError(f"metric {text!r}: only `extract` takes an argument (extract:REGEX)")
        _require_library(name)
        return MetricSpec(name)
    pattern = inline or extract
    if not pattern:
        raise ConfigError(
            "metric 'extract' needs a regex with one group, e.g. --extract '#### (\\S+)' (or extract:REGEX in a config)"
        )
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--extract '{pattern}': does not compile as a regex ({err})") from None
    if compiled.groups < 1:
        raise ConfigError(
            f"--extract '{pattern}': the regex has no group; put the answer in parentheses, e.g. '#### (\\S+)'"
        )
    return MetricSpec("extract", pattern)


def parse_metrics(names: list[str], extract: str | None = None) -> list[MetricSpec]:
    """The metrics of a command line or config, in order, without repeats; `exact` when none is named."""
    specs = [parse_metric(name, extract) for name in (names or ["extract" if extract else "exact"])]
    return list(dict.fromkeys(specs))


def _require_library(name: str) -> None:
    if name not in LIBRARY_METRICS:
        return
    module, package = LIBRARY_METRICS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"metric {name!r} needs the {package} package, which is not installed; pip install 'sftkit[eval]'"
        )


def normalise(text: str) -> str:
    """Lower case, single spaces, trailing punctuation off, and a number written as a number (`1,000.0` → `1000`)."""
    text = " ".join(text.strip().lower().split()).rstrip(".!?;:")
    return normalise_number(text) if _NUMBER.match(text) else text


def normalise_number(text: str) -> str:
    """`$1,000.50` → `1000.5`, `5.0` → `5`, `-3` → `-3`: one spelling per value."""
    digits = text.lstrip("+").replace(",", "").replace("$", "").replace("€", "").replace("£", "").rstrip("%")
    try:
        value = float(digits)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str, pattern: str) -> str | None:
    """The normalised first group of the pattern's last match in `text` (a reply may restate the format
    before its final answer), or None when it does not match."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    group = next((value for value in matches[-1].groups() if value is not None), None)
    return normalise(group) if group is not None else None


def score(spec: MetricSpec, prediction: str, reference: str) -> float:
    """The example's score under a generating metric (0/1 for the matching metrics, 0..100 for the others)."""
    return _SCORERS[spec.name](spec, prediction, reference)


def _exact(spec: MetricSpec, prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def _extract(spec: MetricSpec, prediction: str, reference: str) -> float:
    assert spec.pattern is not None
    # A reference written without the format (a bare "18") is its own answer.
    wanted = extract_answer(reference, spec.pattern) or normalise(reference)
    return float(extract_answer(prediction, spec.pattern) == wanted)


def _contains(spec: MetricSpec, prediction: str, reference: str) -> float:
    return float(normalise(reference) in normalise(prediction))


def _rouge(spec: MetricSpec, prediction: str, reference: str) -> float:
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def _bleu(spec: MetricSpec, prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def _chrf(spec: MetricSpec, prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, [reference]).score)


_ROUGE: list[Any] = []


def _rouge_scorer() -> Any:
    """One RougeScorer for the process (building it loads nltk's stemmer data)."""
    if not _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return _ROUGE[0]


_SCORERS: dict[str, Callable[[MetricSpec, str, str], float]] = {
    "exact": _exact,
    "extract": _extract,
    "contains": _contains,
    "rouge": _rouge,
    "bleu": _bleu,
    "chrf": _chrf,
}
