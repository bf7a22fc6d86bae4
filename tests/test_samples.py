"""Sample generation during training: the run's template, greedy == argmax decoding, stops at the
end-of-turn, and leaves training untouched (mode and every RNG)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sftkit.config import ConfigError
from sftkit.data.template import render_prompt, resolve_chat_template
from sftkit.model.load import load_model, load_tokenizer
from sftkit.monitor.samples import generate_samples, load_sample_prompts

# End-of-turn "!!!" is three tokens of the tiny tokenizer, so stopping must happen on the decoded text.
BANG_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '!!!\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
]


@pytest.fixture()
def model_and_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), torch.float32)  # use_cache=False, as in training
    return model, tokenizer


def always_emit(model, token_id: int) -> None:
    """Replace the output head by one whose argmax is always `token_id`."""
    hidden, vocab = model.lm_head.in_features, model.lm_head.out_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head


def test_greedy_matches_argmax_decoding_with_the_runs_template(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    template = resolve_chat_template("chatml", tokenizer)
    samples = generate_samples(model, tokenizer, template, CONVERSATIONS, max_new_tokens=6)
    for messages, sample in zip(CONVERSATIONS, samples, strict=True):
        ids = tokenizer(render_prompt(messages, template, tokenizer), add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        prompt_length = ids.shape[1]
        with torch.no_grad():
            for _ in range(6):  # no KV cache: the reference for the cached generation
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, prompt_length:]).strip()
        assert sample == {"prompt": messages[-1]["content"], "completion": expected, "ended": False}
    assert model.config.use_cache is False


def test_stops_at_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    always_emit(model, tokenizer.eos_token_id)
    template = resolve_chat_template("llama2", tokenizer)
    samples = generate_samples(model, tokenizer, template, CONVERSATIONS[:1], max_new_tokens=20)
    assert samples == [{"prompt": "What is 12 plus 30?", "completion": "", "ended": True}]


def test_stops_at_a_multi_token_end_of_turn(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bang = tokenizer("!", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("!!!", add_special_tokens=False)["input_ids"]) > 1
    always_emit(model, bang[0])
    samples = generate_samples(model, tokenizer, BANG_TEMPLATE, CONVERSATIONS[:1], max_new_tokens=20)
    assert samples[0]["ended"] is True and samples[0]["completion"] == ""


def test_endless_output_is_not_ended(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    token = tokenizer(" fox", add_special_tokens=False)["input_ids"][0]
    always_emit(model, token)
    samples = generate_samples(model, tokenizer, BANG_TEMPLATE, CONVERSATIONS[:1], max_new_tokens=5)
    assert samples[0]["ended"] is False and samples[0]["completion"] == tokenizer.decode([token] * 5).strip()


def test_sampling_leaves_training_mode_and_every_rng_untouched(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    template = resolve_chat_template("chatml", tokenizer)
    model.train()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    generate_samples(model, tokenizer, template, CONVERSATIONS, max_new_tokens=4, temperature=1.0, top_p=0.9)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert model.training


def test_sampling_is_random_but_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    template = resolve_chat_template("chatml", tokenizer)
    torch.manual_seed(0)
    first = generate_samples(model, tokenizer, template, CONVERSATIONS, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    assert generate_samples(model, tokenizer, template, CONVERSATIONS, max_new_tokens=8, temperature=1.0) == first


def test_sample_prompts_from_a_list_files_or_the_eval_set(tmp_path):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assert load_sample_prompts(["a", "b"], []) == [user("a"), user("b")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "x"}) + "\n\n" + json.dumps("y") + "\n")
    assert load_sample_prompts(str(jsonl), []) == [user("x"), user("y")]
    text = tmp_path / "prompts.txt"
    text.write_text("first line\nsecond line\n")
    assert load_sample_prompts(str(text), []) == [user("first line"), user("second line")]

    conversation = [
        {"role": "system", "content": "s"},
        *user("q1"),
        {"role": "assistant", "content": "a1"},
        *user("q2"),
        {"role": "assistant", "content": "a2"},
    ]
    evals = [conversation, [{"role": "assistant", "content": "no user"}]] + [user(f"p{i}") for i in range(5)]
    assert load_sample_prompts(None, evals, count=3) == [conversation[:2], user("p0"), user("p1")]


def test_sample_prompts_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_sample_prompts(str(tmp_path / "missing.jsonl"), [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line 2"):
        load_sample_prompts(str(bad), [])
