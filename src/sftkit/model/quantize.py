"""4-bit base weights for QLoRA: NF4, double quantisation, bf16 compute (bitsandbytes), on CUDA or CPU.

bitsandbytes quantises and multiplies 4-bit weights on CUDA, and on x86-64 CPUs from
`MIN_CPU_BITSANDBYTES` on. Each forward and backward dequantises every weight block before its
matmul. The 4-bit weights take about 0.52 bytes per linear weight instead of 4 (fp32) or 2 (bf16);
whether a step is slower or faster than LoRA's depends on the machine and the model's size
(`bench/qlora_vs_lora.py` measures both). On a CPU the recipe runs so that it can be tried and tested
where there is no GPU; training a model of real size there is slow either way.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import torch
from packaging.version import Version

from sftkit.model.load import ModelError

MIN_CPU_BITSANDBYTES = "0.47.0"  # first release with 4-bit quantisation and matmul on CPU
CPU_NOTE = (
    "finetuning = 'qlora' without a GPU: bitsandbytes runs the 4-bit layers on the CPU, where training is "
    "slow; it is there to try and test the recipe. bench/qlora_vs_lora.py compares it with lora on this machine"
)


class _KernelsNotice(logging.Filter):
    """Drops bitsandbytes' notice, printed on import on AVX512-BF16 CPUs, that the optional `kernels`
    package is missing: it would fetch a faster kernel from the hub for the CPU inference layout, which
    training never uses (see `keep_4bit_layers_trainable`), and it is printed by LoRA runs too, since
    `import peft` imports bitsandbytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()


def bitsandbytes_version() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_qlora_supported(cuda: bool) -> str | None:
    """Raise when this machine cannot load 4-bit weights; return a note to print once when it can, slowly.

    Runs before any model is loaded, so a run that cannot work fails at once.
    """
    version = bitsandbytes_version()
    needed = "" if cuda else f">={MIN_CPU_BITSANDBYTES}"
    if version is None:
        raise ModelError(
            f"finetuning = 'qlora' needs bitsandbytes{needed} (4-bit weights); "
            f"pip install 'bitsandbytes{needed or '>=' + MIN_CPU_BITSANDBYTES}', or use finetuning: lora"
        )
    if cuda:
        return None
    if Version(version) < Version(MIN_CPU_BITSANDBYTES):
        raise ModelError(
            f"finetuning = 'qlora' without a CUDA GPU needs bitsandbytes>={MIN_CPU_BITSANDBYTES} (4-bit "
            f"on CPU); bitsandbytes {version} is installed. pip install 'bitsandbytes>={MIN_CPU_BITSANDBYTES}', "
            "or use finetuning: lora"
        )
    return CPU_NOTE


KERNELS_NOTICE = _KernelsNotice()


def quiet_kernels_notice() -> None:
    """Filter the notice before anything imports bitsandbytes (`import peft` does, for LoRA runs too)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(KERNELS_NOTICE)  # once: addFilter skips repeats


def quantization_config() -> Any:
    """NF4 with double quantisation and bf16 compute, the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a `Linear4bit` that runs in eval mode without gradients (eval loss,
    samples) rewrites its weight in place into a layout only `gemv_4bit` reads, and keeps using that
    kernel after `model.train()`. `gemv_4bit` has no backward, so from then on no gradient flows
    through the 4-bit layers to the adapters below them (torch warns "an autograd kernel was not
    registered"), and the run depends on when it evaluated, which breaks resume. Training keeps the
    dequantise-then-matmul path throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            # torch types Module.__setattr__ for tensors and modules only; a plain flag is legal
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
