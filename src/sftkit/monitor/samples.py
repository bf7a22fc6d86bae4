"""Generate replies to a few fixed prompts during training (and at inference), with the run's template.

Generation must leave training exactly as it found it: the model's train/eval mode and every random
number generator (python, numpy, torch CPU and CUDA) are restored, so a run with samples draws the
same dropout masks and data order as one without.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from sftkit.config import ConfigError
from sftkit.data.template import end_of_turn, render_prompt
from sftkit.model.attention import generation_attention
from sftkit.rng import capture_rng, restore_rng


class _StopAtText(StoppingCriteria):
    """Stop once the generated text contains `stop` (an end-of-turn that is several tokens, e.g. ` </s>`
    in a tokenizer that splits it, or a template's `<|im_end|>` that is not a special token)."""

    def __init__(self, stop: str, tokenizer: Any, prompt_length: int) -> None:
        self.stop, self.tokenizer, self.prompt_length = stop, tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # input_ids (1, prompt + generated so far)
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :])
        return torch.full((input_ids.shape[0],), self.stop in text, dtype=torch.bool, device=input_ids.device)


def _stop_token_ids(stop: str, tokenizer: Any) -> list[int]:
    """EOS, plus the end-of-turn when it is a single token (`<|im_end|>`, `<|eot_id|>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    if len(encoded) == 1 and encoded[0] not in ids:
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def generate_samples(
    model: Any,
    tokenizer: Any,
    template: str,
    conversations: list[list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[dict]:
    """Reply to each conversation (messages up to, not including, the reply to generate).

    Returns `{"prompt": last user message, "completion": reply text without the end-of-turn,
    "ended": whether the model emitted the end-of-turn or EOS}` per conversation. Greedy when
    temperature is 0.
    """
    stop = end_of_turn(template, tokenizer).strip()
    stop_ids = _stop_token_ids(stop, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    states = capture_rng()
    model.eval()
    samples = []
    try:
        with generation_attention(model):  # varlen is a training kernel: generate on sdpa with a KV cache
            for messages in conversations:
                prompt_text = render_prompt(messages, template, tokenizer)
                # The template writes BOS itself where it wants one, as in training.
                input_ids = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
                    device
                )
                sampling = (
                    {"do_sample": True, "temperature": temperature, "top_p": top_p}
                    if temperature > 0
                    else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
                )
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    stopping_criteria=StoppingCriteriaList([_StopAtText(stop, tokenizer, input_ids.shape[1])]),
                    **sampling,
                )
                samples.append(
                    _decode(
                        output[0, input_ids.shape[1] :].tolist(),
                        stop,
                        stop_ids,
                        tokenizer,
                        prompt=_last_user_message(messages),
                    )
                )
    finally:
        model.train(was_training)
        restore_rng(*states)
    return samples


def _decode(new_ids: list[int], stop: str, stop_ids: list[int], tokenizer: Any, prompt: str) -> dict:
    ended = bool(new_ids) and new_ids[-1] in stop_ids
    if ended:
        new_ids = new_ids[:-1]
    text = tokenizer.decode(new_ids)
    if stop and stop in text:
        text, ended = text[: text.index(stop)], True
    return {"prompt": prompt, "completion": text.strip(), "ended": ended}


def _last_user_message(messages: list[dict]) -> str:
    users = [message["content"] for message in messages if message["role"] == "user"]
    return users[-1] if users else ""


def load_sample_prompts(
    setting: list[str] | str | None, eval_conversations: list[list[dict]], count: int = 4
) -> list[list[dict]]:
    """The conversations to sample from: the config's `sample_prompts` (a list of user messages, or a
    .jsonl file of `{"prompt": ...}` rows, or a text file with one prompt per line), else the first
    `count` eval conversations cut before their first assistant turn."""
    if setting is None:
        cut = [messages[: _first_assistant(messages)] for messages in eval_conversations]
        return [messages for messages in cut if any(m["role"] == "user" for m in messages)][:count]
    if isinstance(setting, str):
        setting = _read_prompts_file(Path(setting))
    return [[{"role": "user", "content": prompt}] for prompt in setting]


def _first_assistant(messages: list[dict]) -> int:
    return next((i for i, message in enumerate(messages) if message["role"] == "assistant"), len(messages))


def _read_prompts_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(
            f"sample_prompts = {str(path)!r}: no such file; give a .jsonl/.txt file of prompts, "
            "or a YAML list of prompts"
        )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f'{path}, line {number}: not valid JSON ({err}); write one {{"prompt": ...}} object per line'
            ) from None
        if isinstance(row, str):
            prompts.append(row)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        else:
            raise ConfigError(f"{path}, line {number}: expected an object with a 'prompt' string, got {line[:80]!r}")
    return prompts
