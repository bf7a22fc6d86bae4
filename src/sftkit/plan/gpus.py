"""Known GPUs, `--gpu-memory` parsing, and the rough throughput used when nothing was measured."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sftkit.config import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float | None = None  # dense bf16 tensor-core peak; None when unknown (given by memory only)


# Usable memory as the driver reports it (a "24GB" card shows ~24 GiB less a little; we use the class).
KNOWN_GPUS: dict[str, Gpu] = {
    gpu.name.lower(): gpu
    for gpu in (
        Gpu("RTX4090", 24 * GIB, 165),
        Gpu("A10-24GB", 24 * GIB, 125),
        Gpu("L4", 24 * GIB, 121),
        Gpu("A100-40GB", 40 * GIB, 312),
        Gpu("A6000", 48 * GIB, 155),
        Gpu("L40S", 48 * GIB, 362),
        Gpu("A100-80GB", 80 * GIB, 312),
        Gpu("H100", 80 * GIB, 989),
        Gpu("H200", 141 * GIB, 989),
    )
}
ALIASES = {
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "a10": "a10-24gb",
    "a100": "a100-80gb",
    "a100-80g": "a100-80gb",
    "a100-40g": "a100-40gb",
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "rtx-a6000": "a6000",
    "l40s-48gb": "l40s",
    "h200-141gb": "h200",
}
# Model FLOPs utilisation assumed for the default throughput: what a plain PyTorch + HF loop reaches.
DEFAULT_MFU = 0.35
QLORA_MFU = 0.25  # dequantising 4-bit weights every matmul costs time

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> int:
    """'80GiB', '80GB', '24G', '40960MiB' → bytes. GB is read as GiB, as GPU vendors mean it."""
    match = _MEMORY.match(text)
    if not match:
        raise ConfigError(f"--gpu-memory = {text!r}: not a size; write e.g. 80GiB, 80GB or 24G")
    value, unit = float(match.group(1)), (match.group(2) or "g").lower()
    scale = GIB if unit.startswith("g") else 2**20
    if value <= 0:
        raise ConfigError(f"--gpu-memory = {text!r}: must be more than 0")
    return int(value * scale)


def resolve_gpu(name: str | None, memory: str | None) -> Gpu | None:
    """The GPU of `--gpu NAME` or `--gpu-memory SIZE`; None when neither is given."""
    if name and memory:
        raise ConfigError("--gpu and --gpu-memory are both given; use one (--gpu-memory for an unlisted GPU)")
    if memory:
        return Gpu(f"{memory.strip()} GPU", parse_gpu_memory(memory))
    if not name:
        return None
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in KNOWN_GPUS:
        known = ", ".join(gpu.name for gpu in KNOWN_GPUS.values())
        raise ConfigError(f"--gpu = {name!r}: unknown GPU; known: {known}; or give --gpu-memory, e.g. 48GiB")
    return KNOWN_GPUS[key]
