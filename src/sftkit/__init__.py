"""sftkit: supervised fine-tuning of causal language models, correct by construction."""

__version__ = "0.1.0"
