"""Config keys of streaming and token-budget mixtures: names, weights, and what they require."""

import pytest

from sftkit.config import ConfigError, validate_config

BASE = {"model_name_or_path": "m", "datasets": [{"path": "data/chat.v2.jsonl"}, {"path": "org/math"}]}


def test_source_names_default_to_the_stem_and_labels_override():
    config = validate_config(BASE)
    assert config.source_names == ["chat.v2", "math"] and not config.is_mixture
    labelled = validate_config({**BASE, "datasets": [{"path": "a/x.jsonl", "label": "chat"}, {"path": "b/x.jsonl"}]})
    assert labelled.source_names == ["chat", "x"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"datasets": [{"path": "a/x.jsonl"}, {"path": "b/x.parquet"}]}, "both named 'x'; give them distinct labels"),
        ({"datasets": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]}, "datasets.1 has no weight"),
        (
            {"datasets": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 3}]},
            "weights on datasets needs max_steps",
        ),
        ({"streaming": True}, "streaming: true needs max_steps"),
        (
            {"streaming": True, "max_steps": 10, "eval_split_ratio": 0.1},
            "eval_split_ratio cannot hold rows out of a stream",
        ),
        ({"datasets": [{"path": "a.jsonl", "weight": 0}]}, "datasets.0.weight"),
    ],
)
def test_bad_mixture_configs_name_the_key(extra, message):
    with pytest.raises(ConfigError) as error:
        validate_config({**BASE, **extra})
    assert message in str(error.value)


def test_a_weighted_mixture_with_max_steps_is_valid():
    config = validate_config(
        {
            **BASE,
            "max_steps": 5,
            "on_exhausted": "stop",
            "datasets": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 3}],
        }
    )
    assert config.is_mixture and config.on_exhausted == "stop"


def test_a_stream_resumes_only_with_the_same_data_settings():
    from sftkit.train.loop import run_fingerprint

    stream = validate_config({**BASE, "streaming": True, "max_steps": 5})
    assert run_fingerprint(stream, 1) != run_fingerprint(stream.model_copy(update={"packing_buffer": 10}), 1)
    plain = validate_config(BASE)
    assert "streaming" not in run_fingerprint(plain, 1)  # runs without streaming or weights: fingerprint as before
    assert all("weight" not in spec for spec in run_fingerprint(plain, 1)["datasets"])
