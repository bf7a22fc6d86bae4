"""Batched greedy generation on the real SmolLM2-135M-Instruct equals one prompt at a time, token for token
(skipped where ../shared is absent). Prompts of different lengths, so the batch is padded on the left."""

from __future__ import annotations

import pytest

from sftkit.data.template import resolve_chat_template
from sftkit.evaluate import load_eval_examples
from sftkit.evaluate.generation import generate_batched
from sftkit.model.load import load_model, load_tokenizer
from tests.conftest import GSM8K, requires


@pytest.mark.slow
@requires(GSM8K)
def test_batched_greedy_equals_one_at_a_time_on_smollm2(smollm2_dir):
    import torch

    tokenizer = load_tokenizer(str(smollm2_dir))
    model = load_model(str(smollm2_dir), torch.float32, vocab_size=len(tokenizer))
    template = resolve_chat_template(None, tokenizer)
    examples = load_eval_examples(
        str(GSM8K / "test.jsonl"), columns={"prompt": "question", "completion": "answer"}, limit=6
    )
    assert len({len(example.question) for example in examples}) == 6  # six prompt lengths: real left padding
    alone = generate_batched(model, tokenizer, template, examples, max_new_tokens=24, batch_size=1)
    batched = generate_batched(model, tokenizer, template, examples, max_new_tokens=24, batch_size=6)
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) == 24 or g.ended for g in alone)
