"""vLLM's offline engine for `sftkit eval --engine vllm` (the optional `vllm` extra, on a GPU): the same prompt
tokens, end-of-turn stops, decoding and scores as the transformers path, generated with vLLM's continuous
batching and paged KV cache instead of padded batches. Nothing else in sftkit imports vLLM.

What vLLM is given for each model:

    adapter (plain LoRA) over a safetensors base   the base, the adapter as a LoRA request: one engine serves
                                                   the tuned model (with the request) and --base (without)
    adapter vLLM cannot serve (DoRA, trainable     a bf16 merged copy in a temporary folder (what
    token rows, modules_to_save) or over a GGUF    `sftkit export --to vllm` writes), removed afterwards
    model folder                                   the folder itself
    GGUF file                                      a bf16 copy in a temporary folder (transformers dequantizes)

Prompts go in as token ids and replies come back as token ids, which sftkit decodes itself, so vLLM's
tokenizer only detokenizes for its stop strings. `loss` reads vLLM's prompt log-probabilities of the reference
tokens (`prompt_logprobs=0`: the logprob of each prompt token itself), the same positions the transformers
path scores. vLLM in bf16 rounds differently from transformers; where two logits are within rounding, greedy
decoding may pick another token, so compare engines by their scores, not token by token.

One engine is alive at a time: the tuned model's is released before the base's starts.
"""

from __future__ import annotations

import gc
import importlib
import json
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sftkit.data.template import IGNORE_INDEX, resolve_chat_template
from sftkit.evaluate.examples import EvalExample
from sftkit.evaluate.generation import (
    Generation,
    ReferenceLoss,
    batches,
    encode_prompts,
    reference_tokens,
    stops,
    to_generation,
)
from sftkit.model.load import ModelError, load_model, load_tokenizer

REQUESTS_PER_CALL = 256  # prompts handed to vLLM at once: large enough to batch well, small enough for a progress bar
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def require_vllm() -> Any:
    """The vllm module, or a ModelError that says how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise ModelError(
            "--engine vllm: vLLM is not installed; on a CUDA machine pip install 'sftkit[vllm]' (vLLM pins its "
            "own torch: install it in an environment of its own), or leave --engine at transformers"
        ) from None


def _requests(prompts: Sequence[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": ids} for ids in prompts]


@dataclass(frozen=True)
class VLLMEngine:
    """One vLLM engine as `score_with` uses it; `lora` (a LoRARequest) puts the tuned adapter over its base."""

    llm: Any
    tokenizer: Any
    template: str
    lora: Any = None

    def generate(
        self, examples: Sequence[EvalExample], max_new_tokens: int, advance: Callable[[int], None] | None = None
    ) -> list[Generation]:
        vllm = require_vllm()
        stop = stops(self.template, self.tokenizer)
        params = vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=stop.token_ids,
            stop=[stop.text] if stop.by_text else None,
            skip_special_tokens=False,
        )
        results: list[Generation] = []
        for prompts in batches(encode_prompts(examples, self.template, self.tokenizer), REQUESTS_PER_CALL):
            outputs = self.llm.generate(_requests(prompts), params, use_tqdm=False, lora_request=self.lora)
            for output in outputs:
                completion = output.outputs[0]
                generation = to_generation(list(completion.token_ids), stop, None, self.tokenizer)
                # vLLM may leave a stop token out of token_ids; its finish reason says it stopped all the same
                results.append(replace(generation, ended=True) if completion.finish_reason == "stop" else generation)
            if advance:
                advance(len(prompts))
        return results

    def reference_losses(
        self, examples: Sequence[EvalExample], max_length: int, advance: Callable[[int], None] | None = None
    ) -> list[ReferenceLoss]:
        vllm = require_vllm()
        params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        encoded = [reference_tokens(example, self.template, self.tokenizer, max_length) for example in examples]
        results: list[ReferenceLoss] = []
        for chunk in batches(encoded, REQUESTS_PER_CALL):
            requests = _requests([ids for ids, _, _ in chunk])
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora)
            for (ids, labels, truncated), output in zip(chunk, outputs, strict=True):
                # prompt_logprobs[t]: {token id: Logprob} of token t given tokens < t (None at t = 0)
                scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX and t > 0]
                loss = -sum(output.prompt_logprobs[t][ids[t]].logprob for t in scored)
                results.append(ReferenceLoss(float(loss), len(scored), truncated))
            if advance:
                advance(len(chunk))
        return results


class VLLMModels:
    """The engines of one `sftkit eval`, started as asked and released (with their temporary copies) when
    `stack` closes. `tuned` first, then `base`."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._llm: Any = None
        self._lora_base: str | None = None  # the base the live engine serves the tuned adapter over
        self._tokenizer_folder = ""
        stack.callback(self._release)

    def tuned(self, name: str) -> tuple[VLLMEngine, Any, str]:
        """(engine, tokenizer, template) of a run directory, adapter or model folder, or GGUF file."""
        from sftkit.export.vllm import export_vllm, unservable_parts
        from sftkit.generate import load_tokenizer_and_template, resolve_weights

        require_vllm()
        if name.endswith(".gguf"):
            tokenizer = load_tokenizer(name)
            template = resolve_chat_template(None, tokenizer)
            folder = self._dense_copy(name, tokenizer)
            self._tokenizer_folder = str(folder)
            return VLLMEngine(self._start(str(folder), str(folder)), tokenizer, template), tokenizer, template
        folder = resolve_weights(Path(name))
        tokenizer, template = load_tokenizer_and_template(folder)
        self._tokenizer_folder = str(folder)
        adapter_config_path = folder / "adapter_config.json"
        if not adapter_config_path.is_file():
            return VLLMEngine(self._start(str(folder), str(folder)), tokenizer, template), tokenizer, template
        adapter_config = json.loads(adapter_config_path.read_text(encoding="utf-8"))
        base = adapter_config.get("base_model_name_or_path")
        if base and not base.endswith(".gguf") and not unservable_parts(adapter_config):
            rank = next((r for r in LORA_RANKS if r >= int(adapter_config.get("r", 16))), LORA_RANKS[-1])
            llm = self._start(base, str(folder), lora_rank=rank)
            self._lora_base = base
            lora = importlib.import_module("vllm.lora.request").LoRARequest("tuned", 1, str(folder))
            return VLLMEngine(llm, tokenizer, template, lora), tokenizer, template
        merged = self._temporary_folder("merged")
        export_vllm(folder, merged, lora=False)  # DoRA, token rows, modules_to_save or a GGUF base: merged in bf16
        return VLLMEngine(self._start(str(merged), str(merged)), tokenizer, template), tokenizer, template

    def base(self, name: str, tokenizer: Any, template: str) -> VLLMEngine:
        """The base model's engine: the live one without the LoRA request where it already serves that base."""
        if self._lora_base == name:
            return VLLMEngine(self._llm, tokenizer, template)
        if name.endswith(".gguf"):
            folder = str(self._dense_copy(name, tokenizer))
            return VLLMEngine(self._start(folder, folder), tokenizer, template)
        return VLLMEngine(self._start(name, self._tokenizer_folder or name), tokenizer, template)

    def _start(self, model: str, tokenizer: str, lora_rank: int | None = None) -> Any:
        self._release()
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        options: dict[str, Any] = {"dtype": "bfloat16" if bf16 else "auto", "seed": 0, "trust_remote_code": False}
        if lora_rank is not None:
            options.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        self._llm = require_vllm().LLM(model=model, tokenizer=tokenizer, **options)
        return self._llm

    def _release(self) -> None:
        """Drop the live engine so its GPU memory can go (the caller holds no engine of it any more)."""
        if self._llm is None:
            return
        self._llm, self._lora_base = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _temporary_folder(self, kind: str) -> Path:
        return Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix=f"sftkit-eval-{kind}-")))

    def _dense_copy(self, name: str, tokenizer: Any) -> Path:
        """A GGUF model as a bf16 safetensors folder vLLM loads like any other."""
        folder = self._temporary_folder("dense")
        load_model(name, torch.bfloat16, vocab_size=len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
