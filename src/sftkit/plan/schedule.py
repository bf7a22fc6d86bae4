"""Batch, steps and learning-rate schedule of a run, with the warnings worth reading before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from sftkit.train.batches import BatchPlan
from sftkit.train.schedule import lr_multiplier, warmup_steps_for

EFFECTIVE_BATCH_RANGE = (16, 128)
MIN_STEPS = 100
# (usual low, usual high, warn below, warn above) per adapter type.
LR_RANGES = {"lora": (1e-4, 2e-4, 5e-5, 5e-4), "qlora": (1e-4, 2e-4, 5e-5, 5e-4), "full": (1e-5, 5e-5, 5e-6, 1e-4)}
SMALL_DATASET = 10_000
MAX_EPOCHS_SMALL = 3


@dataclass(frozen=True)
class ScheduleInputs:
    micro_batch: int
    gradient_accumulation: int
    num_gpus: int
    learning_rate: float
    finetuning: str
    scheduler: str
    min_lr_ratio: float
    warmup_ratio: float
    warmup_steps: int
    num_train_epochs: float
    max_steps: int  # > 0 overrides epochs


@dataclass
class SchedulePlan:
    effective_batch: int
    sequences_per_epoch: int | None  # packed sequences or examples; None when the data could not be read
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None
    epochs: float | None
    lr_points: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_schedule(inputs: ScheduleInputs, sequences: int | None, examples: int | None) -> SchedulePlan:
    """`sequences`: what one epoch iterates (packed sequences when packing, else examples)."""
    effective = inputs.micro_batch * inputs.gradient_accumulation * inputs.num_gpus
    steps_per_epoch = total = epochs = None
    if sequences is not None:  # the loop's own arithmetic; only the count of sequences matters to it
        batches = BatchPlan([[]] * sequences, inputs.micro_batch, inputs.gradient_accumulation, inputs.num_gpus, 0)
        steps_per_epoch = batches.steps_per_epoch
        total = batches.total_steps(inputs.num_train_epochs, inputs.max_steps)
        epochs = batches.epoch_of(total)
    elif inputs.max_steps > 0:
        total = inputs.max_steps
    plan = SchedulePlan(effective, sequences, steps_per_epoch, total, None, epochs)
    if total is not None:
        plan.warmup_steps = warmup_steps_for(total, inputs.warmup_ratio, inputs.warmup_steps)
        plan.lr_points = lr_table(inputs, total, plan.warmup_steps)
    plan.warnings = schedule_warnings(inputs, plan, examples)
    return plan


def lr_table(inputs: ScheduleInputs, total: int, warmup: int, points: int = 11) -> list[dict[str, float]]:
    """The LR at `points` evenly spaced optimizer steps from the first to the last."""
    rows = []
    for i in range(points):
        step = round(i * (total - 1) / (points - 1))
        fraction = lr_multiplier(step, total, warmup, inputs.scheduler, inputs.min_lr_ratio)
        rows.append(
            {
                "step": step + 1,
                "progress": (step + 1) / total,
                "lr": inputs.learning_rate * fraction,
                "fraction_of_peak": fraction,
            }
        )
    return rows


def schedule_warnings(inputs: ScheduleInputs, plan: SchedulePlan, examples: int | None) -> list[str]:
    warnings = []
    low, high = EFFECTIVE_BATCH_RANGE
    if not low <= plan.effective_batch <= high:
        warnings.append(
            f"effective batch {plan.effective_batch} is outside the usual {low}–{high}; "
            "change per_device_train_batch_size or gradient_accumulation_steps"
        )
    if plan.total_steps is not None and plan.total_steps < MIN_STEPS:
        warnings.append(
            f"only {plan.total_steps} optimizer steps (fewer than ~{MIN_STEPS}): warmup and decay have "
            "little room; lower gradient_accumulation_steps or train more epochs"
        )
    usual_low, usual_high, warn_low, warn_high = LR_RANGES[inputs.finetuning]
    if not warn_low <= inputs.learning_rate <= warn_high:
        warnings.append(
            f"learning_rate {inputs.learning_rate:g} is far from the usual {usual_low:g}–{usual_high:g} "
            f"for {inputs.finetuning}"
        )
    epochs = plan.epochs if plan.epochs is not None else (inputs.num_train_epochs if inputs.max_steps <= 0 else None)
    if examples is not None and examples < SMALL_DATASET and epochs is not None and epochs > MAX_EPOCHS_SMALL:
        warnings.append(
            f"{epochs:.1f} epochs over {examples:,} examples (< {SMALL_DATASET:,}) risks memorising them; "
            f"{MAX_EPOCHS_SMALL} or fewer is usual"
        )
    return warnings
