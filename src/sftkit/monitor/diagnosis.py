"""Watch a run's numbers as they arrive and say, once per kind, what is going wrong and what to do.

The loop feeds every optimizer step, every eval and every round of sample generations to a
`Monitor`. Each detector looks at the history so far and, the first time its failure shows, returns a
`Finding` (the loop prints it) and appends it to `OUTPUT_DIR/diagnosis.jsonl`:

    kind                  fires when                                               first thing to try
    non_finite            loss or grad norm is NaN/inf                             bf16 instead of fp16, lower LR
    loss_flat             after warmup + a window, loss has not dropped             raise LR / fix the mask
    train_loss_near_zero  train loss ~0 in the first half of the run               fewer epochs, more data
    overfitting           eval loss rises above its best while train loss falls     use the best checkpoint
    loss_spike            loss > 2x the running median                              lower LR, inspect the batch
    grad_norm_spike       grad norm > 5x the running median                        clip lower, longer warmup
    lr_mismatch           logged LR differs from the configured schedule            scheduler stepping / resume
    no_end_of_turn        no sample ends with the end-of-turn token                 EOS in labels, template
    repetition            half the samples repeat themselves                        same, plus more steps

Thresholds are deliberately loose: a warning that cries wolf gets ignored.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPIKE_HISTORY = 50  # steps in the running median that spikes are measured against
SPIKE_MIN_HISTORY = 10  # finite steps seen before a spike can be called
LOSS_SPIKE_FACTOR = 2.0
GRAD_SPIKE_FACTOR = 5.0
FLAT_MIN_DROP = 0.02  # the loss must fall by 2% of its starting level after warmup + a window
NEAR_ZERO_LOSS = 0.02
LR_TOLERANCE = 0.01  # relative
LOW_TRAINED_FRACTION = 0.05


@dataclass
class Finding:
    step: int
    kind: str
    message: str
    evidence: dict
    advice: str

    def __str__(self) -> str:
        return f"step {self.step} [{self.kind}] {self.message}. {self.advice}"


@dataclass(frozen=True)
class MonitorSettings:
    learning_rate: float
    total_steps: int
    warmup_steps: int
    expected_lr: Callable[[int], float]  # LR the schedule should give at optimizer step s (1-based, as logged)
    trained_token_fraction: float  # share of tokens that carry loss (from data stats)
    precision: str  # "fp32" | "bf16" | "fp16"

    @property
    def flat_window(self) -> int:
        """Steps averaged at the start and at the end of the `loss_flat` comparison."""
        return max(5, min(50, self.total_steps // 10))

    @property
    def settled_step(self) -> int:
        """From here on a model should have picked up the output format (used by the sample checks)."""
        return max(self.warmup_steps, self.total_steps // 4)


@dataclass
class _History:
    losses: list[float] = field(default_factory=list)  # finite losses, in order
    recent_losses: deque = field(default_factory=lambda: deque(maxlen=SPIKE_HISTORY))
    recent_grad_norms: deque = field(default_factory=lambda: deque(maxlen=SPIKE_HISTORY))
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_loss, eval_loss)
    best_checkpoint: str | None = None


class Monitor:
    """Detectors over the metric stream. `findings` holds every finding so far; each kind fires once."""

    def __init__(self, settings: MonitorSettings, path: Path | None) -> None:
        self.settings = settings
        self.path = Path(path) if path is not None else None
        self.findings = _read_findings(self.path)  # a resumed run does not warn again
        self._history = _History()

    # ------------------------------------------------------------------ entry points

    def observe_step(
        self, step: int, loss: float, grad_norm: float, lr: float, example_ids: list[int]
    ) -> list[Finding]:
        """Called after every optimizer step with its loss, pre-clip grad norm, LR and the batch's example ids."""
        candidates = [
            self._non_finite(step, loss, grad_norm, lr, example_ids),
            self._spike(step, "loss_spike", loss, self._history.recent_losses, LOSS_SPIKE_FACTOR, example_ids),
            self._spike(
                step, "grad_norm_spike", grad_norm, self._history.recent_grad_norms, GRAD_SPIKE_FACTOR, example_ids
            ),
            self._lr_mismatch(step, lr),
        ]
        if math.isfinite(loss):
            self._history.losses.append(loss)
            self._history.recent_losses.append(loss)
        if math.isfinite(grad_norm):
            self._history.recent_grad_norms.append(grad_norm)
        candidates += [self._loss_flat(step, lr), self._near_zero(step)]
        return self._emit(candidates)

    def observe_eval(
        self, step: int, train_loss: float, eval_loss: float, best_checkpoint: str | None
    ) -> list[Finding]:
        """Called after every eval with the latest train loss and the best checkpoint so far (if saved)."""
        if best_checkpoint is not None:
            self._history.best_checkpoint = best_checkpoint
        if math.isfinite(eval_loss):
            self._history.evals.append((step, train_loss, eval_loss))
        return self._emit([self._overfitting(step)])

    def observe_samples(self, step: int, samples: list[dict]) -> list[Finding]:
        """Called with the generations of one sample step (`prompt`, `completion`, `ended`)."""
        if not samples or step < self.settings.settled_step:
            return []
        return self._emit([self._no_end_of_turn(step, samples), self._repetition(step, samples)])

    # ------------------------------------------------------------------ detectors

    def _non_finite(
        self, step: int, loss: float, grad_norm: float, lr: float, example_ids: list[int]
    ) -> Finding | None:
        # fp16 loss scaling overflows the gradients now and then by design: the scaler skips the step
        # and lowers the scale. Only a non-finite loss is a problem there.
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.settings.precision == "fp16"):
            return None
        advice = f"lower the learning rate (it is {lr:g}) or lengthen the warmup"
        if self.settings.precision == "fp16":
            advice = "fp16 overflows above 65504: use bf16 where the GPU supports it; otherwise " + advice
        if self.settings.trained_token_fraction == 0:
            advice = "no token carries loss (0/0): check the assistant mask with `sftkit data inspect`; " + advice
        return Finding(
            step,
            "non_finite",
            f"{'loss' if not math.isfinite(loss) else 'grad norm'} is not finite",
            {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "precision": self.settings.precision,
                "example_ids": list(example_ids),
            },
            advice + "; `max_bad_steps` lets a run skip a few such steps",
        )

    def _spike(
        self, step: int, kind: str, value: float, history: deque, factor: float, example_ids: list[int]
    ) -> Finding | None:
        if not math.isfinite(value) or len(history) < SPIKE_MIN_HISTORY or step <= self.settings.warmup_steps:
            return None
        median = statistics.median(history)
        if median <= 0 or value <= factor * median:
            return None
        name = "loss" if kind == "loss_spike" else "grad norm"
        return Finding(
            step,
            kind,
            f"{name} {value:.4g} is {value / median:.1f}x its running median {median:.4g}",
            {
                name.replace(" ", "_"): value,
                "running_median": median,
                "window": len(history),
                "example_ids": list(example_ids),
            },
            "look at these examples (bad labels, very long or odd rows); if spikes recur, lower the "
            "learning rate or max_grad_norm",
        )

    def _lr_mismatch(self, step: int, lr: float) -> Finding | None:
        expected = self.settings.expected_lr(step)
        if math.isclose(lr, expected, rel_tol=LR_TOLERANCE, abs_tol=1e-12 + self.settings.learning_rate * 1e-6):
            return None
        return Finding(
            step,
            "lr_mismatch",
            f"the learning rate is {lr:.4g} but the schedule asks for {expected:.4g}",
            {
                "lr": lr,
                "expected_lr": expected,
                "peak_lr": self.settings.learning_rate,
                "warmup_steps": self.settings.warmup_steps,
                "total_steps": self.settings.total_steps,
            },
            "the scheduler is not stepping once per optimizer step, or a resume did not restore it; "
            "check lr_scheduler_type, warmup and gradient_accumulation_steps",
        )

    def _loss_flat(self, step: int, lr: float) -> Finding | None:
        window = self.settings.flat_window
        losses = self._history.losses
        if step < self.settings.warmup_steps + window or len(losses) < 2 * window:
            return None
        start, recent = statistics.median(losses[:window]), statistics.median(losses[-window:])
        if recent < start * (1 - FLAT_MIN_DROP):
            return None
        fraction = self.settings.trained_token_fraction
        evidence = {
            "start_loss": start,
            "recent_loss": recent,
            "window": window,
            "lr": lr,
            "trained_token_fraction": fraction,
        }
        if fraction < LOW_TRAINED_FRACTION:
            advice = (
                f"only {fraction:.1%} of tokens carry loss: check the chat template's assistant mask "
                "(`sftkit data inspect` shows the trained tokens) and that examples are not truncated "
                "before the reply"
            )
        else:
            advice = (
                f"the learning rate ({self.settings.learning_rate:g}) may be too low: LoRA usually wants "
                "1e-4 to 3e-4, full fine-tuning 1e-5 to 5e-5"
            )
        return Finding(
            step, "loss_flat", f"loss has not decreased since the start ({start:.4g} -> {recent:.4g})", evidence, advice
        )

    def _near_zero(self, step: int) -> Finding | None:
        losses = self._history.losses
        if step > self.settings.total_steps / 2 or len(losses) < 3 or losses[0] < 10 * NEAR_ZERO_LOSS:
            return None  # a loss that starts at ~0 is a masking problem, not memorisation
        recent = statistics.median(losses[-3:])
        if recent >= NEAR_ZERO_LOSS:
            return None
        return Finding(
            step,
            "train_loss_near_zero",
            f"training loss is {recent:.4g} at step {step} of {self.settings.total_steps}: the model "
            "is memorising the training data",
            {
                "loss": recent,
                "first_loss": losses[0],
                "total_steps": self.settings.total_steps,
                "best_checkpoint": self._history.best_checkpoint,
            },
            "stop early or train fewer epochs, lower the learning rate, or add more data"
            + self._best_checkpoint_hint(),
        )

    def _overfitting(self, step: int) -> Finding | None:
        evals = self._history.evals
        if len(evals) < 2:
            return None
        best_step, best_train, best_eval = min(evals, key=lambda e: e[2])
        _, _, previous_eval = evals[-2]
        _, train_now, eval_now = evals[-1]
        rising = (eval_now > best_eval * 1.02 and previous_eval > best_eval) or eval_now > best_eval * 1.10
        if not rising or not train_now < best_train:
            return None
        return Finding(
            step,
            "overfitting",
            f"eval loss rose from {best_eval:.4g} (step {best_step}) to {eval_now:.4g} while training "
            f"loss fell from {best_train:.4g} to {train_now:.4g}",
            {
                "best_step": best_step,
                "best_eval_loss": best_eval,
                "eval_loss": eval_now,
                "train_loss_at_best": best_train,
                "train_loss": train_now,
                "best_checkpoint": self._history.best_checkpoint,
            },
            "stop here or train fewer epochs, lower the learning rate, or add more data" + self._best_checkpoint_hint(),
        )

    def _no_end_of_turn(self, step: int, samples: list[dict]) -> Finding | None:
        if any(sample["ended"] for sample in samples):
            return None
        return Finding(
            step,
            "no_end_of_turn",
            f"none of the {len(samples)} samples emitted the end-of-turn token",
            {"samples": len(samples), "prompts": [sample["prompt"][:80] for sample in samples]},
            "the model has not learned to stop: check that the end-of-turn/EOS token is trained "
            "(`sftkit data inspect` shows it in the trained span), that pad != eos, and that "
            "generation uses the training template; or raise max_new_tokens if replies are long",
        )

    def _repetition(self, step: int, samples: list[dict]) -> Finding | None:
        repeating = [sample for sample in samples if is_repetitive(sample["completion"])]
        if len(repeating) * 2 < len(samples):
            return None
        return Finding(
            step,
            "repetition",
            f"{len(repeating)} of {len(samples)} samples repeat themselves",
            {"samples": len(samples), "repeating": len(repeating), "example": repeating[0]["completion"][:200]},
            "degenerate output: check EOS handling and the chat template; more steps or a higher "
            "learning rate may be needed if the loss is still high",
        )

    # ------------------------------------------------------------------ plumbing

    def _best_checkpoint_hint(self) -> str:
        best = self._history.best_checkpoint
        return f"; the best checkpoint so far is {best}" if best else ""

    def _emit(self, candidates: list[Finding | None]) -> list[Finding]:
        warned = {finding.kind for finding in self.findings}
        new: list[Finding] = []
        for finding in candidates:
            if finding is None or finding.kind in warned:
                continue
            warned.add(finding.kind)
            new.append(finding)
        self.findings += new
        if new and self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                for finding in new:
                    handle.write(json.dumps(_json_safe(asdict(finding))) + "\n")
        return new


def _json_safe(value: Any) -> Any:
    """Strict JSON (jq and browsers reject NaN): non-finite floats become "nan" / "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _read_findings(path: Path | None) -> list[Finding]:
    if path is None or not path.exists():
        return []
    findings = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            findings.append(Finding(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a line cut short by a crash
    return findings


def is_repetitive(text: str, n: int = 3, min_units: int = 12, max_distinct: float = 0.5) -> bool:
    """True when fewer than half of the text's n-grams are distinct: words where the text has enough
    of them, else characters (for output like "!!!!!!!!" or "abcabcabc")."""
    units: list[str] | str = text.split()
    if len(units) < min_units:
        units, n = text.strip(), 4
        if len(units) < 3 * min_units:
            return False
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams) < max_distinct
