"""`activation_offloading`: tensors autograd saves in forward wait in pinned host memory until backward.

    forward  (compute stream)   layer 1 ─ layer 2 ─ layer 3 ─ …
    offload  (side stream)          └copy→host └copy→host └copy→host     GPU block reusable when its copy is done
    backward (compute stream)   … ─ layer 3 ─ layer 2 ─ layer 1         each saved tensor copied back as it is unpacked

Through `torch.autograd.graph.saved_tensors_hooks`: `pack` starts an asynchronous device→host copy into a
pinned buffer on a side stream and lets the device tensor go (`record_stream` keeps its block from reuse
until the copy has run); `unpack` makes the compute stream wait for that copy and copies back. Copies
back are not prefetched, so backward waits on each one (host↔device bandwidth, ~25 GB/s on PCIe 4).
With gradient checkpointing only each layer's input is saved, so exactly those move to the host.

Parameters (and views of them), non-contiguous views and tensors under `min_bytes` stay where they are:
copying weights would double the traffic for nothing, a broadcast view would grow on the host, and small
tensors cost more in copy latency than they save.
Host memory needed: the activations the step keeps for backward, in pinned RAM.

On a machine without CUDA, activations already live in host memory: the setting does nothing, and
says so once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

MESSAGE_WITHOUT_CUDA = (
    "activation_offloading: no CUDA device, so activations are in host memory already; "
    "the setting has no effect on this machine"
)
_told = False


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of every forward run inside this context go to pinned host memory (CUDA only)."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self.stream = torch.cuda.Stream()
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        if (
            not tensor.is_cuda
            or not tensor.is_contiguous()
            or _is_parameter(tensor)
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # the tensor is fully written before it is copied
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its block is not reused before the copy above has run
        return _Offloaded(host, tensor.device, copied)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        torch.cuda.current_stream().wait_event(packed.copied)
        return packed.host.to(packed.device, non_blocking=True)  # pinned source: asynchronous, ordered on this stream


class _Offloaded:
    __slots__ = ("copied", "device", "host")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Any) -> None:
        self.host, self.device, self.copied = host, device, copied


def _is_parameter(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(getattr(tensor, "_base", None), nn.Parameter)


def activation_offloading(enabled: bool, tell: Callable[[str], Any] = print) -> AbstractContextManager:
    """The context the training forward runs in: offloading on CUDA, nothing otherwise (said once)."""
    global _told
    if not enabled:
        return nullcontext()
    if not torch.cuda.is_available():
        if not _told:
            tell(MESSAGE_WITHOUT_CUDA)
            _told = True
        return nullcontext()
    return OffloadActivations()
