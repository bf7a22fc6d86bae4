"""The cheapest changes to a run that does not fit (or fits with much room), each with its new estimate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory

ROOMY = 0.5  # a run using less than this fraction of the GPU has room to go faster
COMFORTABLE = 0.9  # estimates are ±15%: a change that leaves less than 10% free gets a safer combination too
FSDP_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class Change:
    what: str  # e.g. "gradient_checkpointing: true"
    total: int  # new bytes per GPU
    fits: bool
    note: str = ""  # what it costs


@dataclass(frozen=True)
class Setting:
    """A point in the space of settings the advice moves through."""

    inputs: MemoryInputs
    finetuning: str
    gradient_accumulation: int


def advise(
    setting: Setting, total: int, gpu_bytes: int, meta_for: Callable[[str], MetaModel], full_lengths: list[int] | None
) -> list[Change]:
    """`meta_for(finetuning)` builds (or reuses) the meta model of another fine-tuning method;
    `full_lengths`: untruncated example lengths, to count what a shorter max_seq_length truncates."""

    def estimate(candidate: Setting) -> int:
        return estimate_memory(meta_for(candidate.finetuning), candidate.inputs).total

    changes: list[Change] = []
    if total <= gpu_bytes * ROOMY:
        return _roomy(setting, gpu_bytes, estimate)
    if total <= gpu_bytes:
        return changes
    singles = _single_changes(setting, full_lengths)
    for what, change, note in singles:
        new_total = estimate(change(setting))
        if "FSDP" in what and (new_total > gpu_bytes or any("FSDP" in c.what for c in changes)):
            continue  # only the fewest GPUs that make it fit: sharding does not touch activations
        changes.append(Change(what, new_total, new_total <= gpu_bytes, note))
    changes.sort(key=lambda change: (not change.fits, "FSDP" in change.what, change.total))
    if not any(change.total <= gpu_bytes * COMFORTABLE for change in changes):
        changes.insert(0, _combined(setting, singles, gpu_bytes * COMFORTABLE, estimate))
    return changes


Transform = Callable[[Setting], Setting]


def _single_changes(setting: Setting, full_lengths: list[int] | None) -> list[tuple[str, Transform, str]]:
    """(what to write in the config, the change, what it costs), each applicable to any setting."""
    inputs = setting.inputs
    singles: list[tuple[str, Transform, str]] = []
    if not inputs.gradient_checkpointing:
        singles.append(
            (
                "gradient_checkpointing: true",
                lambda s: replace(s, inputs=replace(s.inputs, gradient_checkpointing=True)),
                "~30% slower steps (layers are recomputed in backward)",
            )
        )
    if inputs.micro_batch > 1:
        singles.append(
            (
                (
                    f"per_device_train_batch_size: {inputs.micro_batch // 2}, "
                    f"gradient_accumulation_steps: {setting.gradient_accumulation * 2}"
                ),
                lambda s: Setting(
                    replace(s.inputs, micro_batch=max(1, s.inputs.micro_batch // 2)),
                    s.finetuning,
                    s.gradient_accumulation * 2,
                ),
                "same effective batch, smaller matmuls",
            )
        )
    if not inputs.chunked_loss:
        singles.append(
            (
                "chunked_loss: true",
                lambda s: replace(s, inputs=replace(s.inputs, chunked_loss=True)),
                "same loss, the logits are never held whole",
            )
        )
    if setting.finetuning == "full":
        singles.append(
            ("finetuning: lora", lambda s: replace(s, finetuning="lora"), "trains adapters, not all weights")
        )
    if setting.finetuning in ("full", "lora"):
        singles.append(
            (
                "finetuning: qlora",
                lambda s: replace(s, finetuning="qlora"),
                "4-bit base weights: slower steps, slightly lower quality",
            )
        )
    shorter = inputs.seq_len // 2
    if shorter >= 128:
        truncated = sum(n > shorter for n in full_lengths) if full_lengths is not None else None
        note = (
            f"truncates {truncated:,} of {len(full_lengths):,} examples"
            if full_lengths is not None
            else "how many examples it truncates is unknown (data not read)"
        )
        singles.append(
            (f"max_seq_length: {shorter}", lambda s: replace(s, inputs=replace(s.inputs, seq_len=shorter)), note)
        )
    for shards in FSDP_SIZES:
        if shards > inputs.shards:
            singles.append(
                (
                    f"FSDP across {shards} GPUs",
                    _sharded(shards),
                    "weights, gradients and optimizer states split across the GPUs",
                )
            )
    return singles


def _sharded(shards: int) -> Transform:
    return lambda s: replace(s, inputs=replace(s.inputs, shards=shards))


def _combined(
    setting: Setting, singles: list[tuple[str, Transform, str]], budget: float, estimate: Callable[[Setting], int]
) -> Change:
    """Single-GPU changes applied one after another until the run fits in `budget` bytes; then each
    one that the rest do not need is dropped again."""
    chosen: list[tuple[str, Transform]] = []

    def apply(changes: list[tuple[str, Transform]]) -> int:
        candidate = setting
        for _, change in changes:
            candidate = change(candidate)
        return estimate(candidate)

    for what, change, _ in singles:
        if "FSDP" not in what:
            chosen.append((what, change))
            if apply(chosen) <= budget:
                break
    for item in list(chosen[:-1]):
        fewer = [other for other in chosen if other is not item]
        if apply(fewer) <= budget:
            chosen = fewer
    new_total = apply(chosen)
    return Change(
        " + ".join(what for what, _ in chosen),
        new_total,
        new_total <= budget / COMFORTABLE,
        "together, leaving 10% free" if new_total <= budget else "together",
    )


def _roomy(setting: Setting, gpu_bytes: int, estimate: Callable[[Setting], int]) -> list[Change]:
    """Ways to spend spare memory on speed."""
    inputs, changes = setting.inputs, []
    if inputs.gradient_checkpointing:
        candidate = replace(setting, inputs=replace(inputs, gradient_checkpointing=False))
        total = estimate(candidate)
        changes.append(
            Change("gradient_checkpointing: false", total, total <= gpu_bytes, "~25% faster steps (no recomputation)")
        )
    if setting.gradient_accumulation > 1:
        accumulation = max(1, setting.gradient_accumulation // 2)
        micro = inputs.micro_batch * setting.gradient_accumulation // accumulation
        candidate = Setting(replace(inputs, micro_batch=micro), setting.finetuning, accumulation)
        total = estimate(candidate)
        changes.append(
            Change(
                f"per_device_train_batch_size: {micro}, gradient_accumulation_steps: {accumulation}",
                total,
                total <= gpu_bytes,
                "same effective batch, better GPU utilisation",
            )
        )
    return [change for change in changes if change.fits]
