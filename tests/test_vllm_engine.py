"""`sftkit eval --engine vllm` against `--engine transformers`, through a stand-in of vLLM's offline API
(tests/fixtures/vllm_standin: greedy decoding one prompt at a time on transformers, no KV cache), since vLLM
itself needs a GPU: same predictions and scores, the adapter served as a LoRA request over its base by one
engine, an adapter vLLM cannot serve merged into a temporary copy, one engine alive at a time, and the error
when vLLM is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sftkit.evaluate import EvalOptions, evaluate, parse_metrics
from sftkit.model.load import ModelError
from tests.conftest import FIXTURES
from tests.export_helpers import build_adapter, build_chat_model

METRICS = ["extract", "contains", "loss"]


@pytest.fixture
def standin(monkeypatch):
    """The stand-in `vllm` package, imported fresh, its record of started engines emptied."""
    monkeypatch.syspath_prepend(str(FIXTURES / "vllm_standin"))
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    yield vllm
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"question": f"what is {i} plus {i} and why", "answer": f"it is\n#### {2 * i}"} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _evaluate(model: Path, data: Path, engine: str, base_model: Path | None = None):
    return evaluate(
        EvalOptions(
            model=str(model),
            data=str(data),
            metrics=parse_metrics(METRICS, "#### (\\S+)"),
            base=base_model is not None or (model / "adapter_config.json").is_file(),
            base_model=str(base_model) if base_model else None,
            columns={"prompt": "question", "completion": "answer"},
            max_new_tokens=10,
            batch_size=3,
            engine=engine,
        )
    )


def _assert_same_scores(vllm_result, transformers_result):
    """Predictions and generated scores identical; the loss equal to float rounding."""
    assert vllm_result.engine == "vllm" and transformers_result.engine == "transformers"
    for ours, theirs in zip(vllm_result.rows, transformers_result.rows, strict=True):
        for model in ("tuned", "base"):
            if model not in theirs:
                continue
            assert ours[model]["prediction"] == theirs[model]["prediction"]
            assert ours[model]["ended"] == theirs[model]["ended"]
            assert ours[model]["scores"]["loss"] == pytest.approx(theirs[model]["scores"]["loss"], rel=1e-4)
            assert {k: v for k, v in ours[model]["scores"].items() if k != "loss"} == {
                k: v for k, v in theirs[model]["scores"].items() if k != "loss"
            }
    assert any(row["tuned"]["prediction"] for row in transformers_result.rows)


def test_model_folder_and_base_score_as_with_transformers(standin, chat_model, other_base, data):
    ours = _evaluate(chat_model, data, "vllm", base_model=other_base)
    _assert_same_scores(ours, _evaluate(chat_model, data, "transformers", base_model=other_base))
    assert [(s["model"], s["enable_lora"], s["others_alive"]) for s in standin.STARTED] == [
        (str(chat_model), False, 0),
        (str(other_base), False, 0),  # the tuned model's engine was released first
    ]


def test_lora_adapter_is_a_request_over_its_base_in_one_engine(standin, tmp_path, chat_model, data):
    adapter = build_adapter(chat_model, tmp_path / "adapter", init_lora_weights=False)
    ours = _evaluate(adapter, data, "vllm")
    theirs = _evaluate(adapter, data, "transformers")
    _assert_same_scores(ours, theirs)
    assert [(s["model"], s["enable_lora"], s["max_lora_rank"]) for s in standin.STARTED] == [
        (str(chat_model), True, 8)  # r = 4 rounds up to vLLM's smallest max_lora_rank
    ]
    assert any(row["tuned"]["prediction"] != row["base"]["prediction"] for row in ours.rows)  # the adapter acts


def test_adapter_vllm_cannot_serve_is_merged_into_a_copy_removed_afterwards(standin, tmp_path, chat_model, data):
    """Trainable token rows: what vLLM is given is the bf16 merge `sftkit export --to vllm` writes."""
    from sftkit import export

    adapter = build_adapter(chat_model, tmp_path / "adapter", trainable_token_indices=[3, 5, 7])
    ours = _evaluate(adapter, data, "vllm")  # and its base, in an engine of its own
    merged, base = standin.STARTED
    assert "sftkit-eval-merged-" in merged["model"] and not merged["enable_lora"]
    assert not Path(merged["model"]).exists()
    assert (base["model"], base["others_alive"]) == (str(chat_model), 0)
    exported = export(adapter, tmp_path / "exported", to="vllm").path
    theirs = _evaluate(exported, data, "transformers")
    _assert_same_scores(ours, theirs)  # theirs loads the bf16 weights as bf16, the stand-in as float32


def test_gguf_model_is_given_to_vllm_as_a_dense_copy(standin, tmp_path):
    """A GGUF file (its own template; `<|im_end|>` one token here, a stop string in the tests above)."""
    pytest.importorskip("gguf")
    from sftkit import export

    gguf_file = export(build_chat_model(tmp_path / "chat"), tmp_path / "gguf", to="gguf", quant="f32").path
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]})
        + "\n",
        encoding="utf-8",
    )
    options = {"data": str(chat), "metrics": parse_metrics(["contains", "loss"]), "max_new_tokens": 8}
    ours = evaluate(EvalOptions(model=str(gguf_file), engine="vllm", **options))
    theirs = evaluate(EvalOptions(model=str(gguf_file), **options))
    (started,) = standin.STARTED
    assert "sftkit-eval-dense-" in started["model"] and not Path(started["model"]).exists()
    assert ours.rows[0]["tuned"]["prediction"] == theirs.rows[0]["tuned"]["prediction"]
    assert ours.metrics[1].tuned == pytest.approx(theirs.metrics[1].tuned, rel=1e-2)  # bf16 copy against float32


def test_missing_vllm_says_how_to_get_it(monkeypatch, chat_model, data):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'sftkit\[vllm\]'"):
        _evaluate(chat_model, data, "vllm")
    with pytest.raises(ModelError, match="--engine vlm: unknown engine; choose one of transformers, vllm"):
        _evaluate(chat_model, data, "vlm")
