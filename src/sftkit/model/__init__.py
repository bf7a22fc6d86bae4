"""The model side of a run: load.py (base model, tokenizer), quantize.py (4-bit weights), adapters.py."""

from sftkit.model.quantize import quiet_kernels_notice

quiet_kernels_notice()  # every path to peft (and so to bitsandbytes) imports this package first
