"""Every random number generator a run draws from, captured and restored as one state.

The state is JSON-able values plus tensors (no pickle), so checkpoints can store it as JSON and
safetensors; sample generation uses the same pair to leave the training stream untouched.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(python and numpy state as plain values, torch CPU and every CUDA device's state as tensors)."""
    version, state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    if isinstance(numpy_state, dict):  # the global generator was replaced by one that is not MT19937
        raise RuntimeError(f"numpy's global random generator is {numpy_state['bit_generator']}; only MT19937 is saved")
    kind, keys, pos, has_gauss, cached = numpy_state
    plain = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
