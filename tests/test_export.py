"""`sftkit export` on tiny models: the GGUF file read back by transformers' own GGUF reader (the reverse
tensor-name map, q/k layout and tokenizer builder) gives the exported model; quantised weights are
exactly what the gguf package's quantizers give; the run's template and end-of-turn travel with it.
The real model, training included, is in test_export_real.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.errors import SftkitError
from sftkit.export import QUANTS, ExportError, export
from sftkit.export.hub import HubError
from sftkit.model.load import ModelError
from tests.conftest import LLAMA2_TOKENIZER, requires
from tests.export_helpers import TEXTS, build_adapter, build_chat_model, gguf_fields, logits


def reload(path: Path):
    return (
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name),
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
    )


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_f16_gguf_reloads_as_the_same_model_and_tokenizer(tmp_path, arch, tied):
    # Qwen3: head_dim 128 ≠ hidden / heads, written as key_length; transformers' reader takes Qwen3's default 128
    folder = build_chat_model(tmp_path / "model", arch, tied, **({"head_dim": 128} if arch == "qwen3" else {}))
    result = export(folder, tmp_path / "out", quant="f16")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded, reloaded_tokenizer = reload(result.path)

    for text in TEXTS:  # the tokenizer rebuilt from the file splits text and special tokens alike
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.config.tie_word_embeddings == tied
    expected, got = logits(model, tokenizer), logits(reloaded, tokenizer)
    assert (got - expected).abs().max() < 2e-3  # f16 rounding of the weights only
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    fields = gguf_fields(result.path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.chat_template"] == (folder / "chat_template.jinja").read_text()
    assert fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if arch == "qwen2" else "gpt-2")


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """Llama 3.1's scaled RoPE: llama.cpp divides each frequency by the `rope_freqs` entry. High frequencies
    (wavelength under original_max / high_freq_factor) keep theirs (1), low ones are divided by `factor`."""
    import gguf

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    folder = build_chat_model(tmp_path / "model", rope_parameters=scaling)
    result = export(folder, tmp_path / "out")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(result.path).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    wavelength = 2 * np.pi * 10000.0 ** (np.arange(0, 16, 2) / 16)
    assert factors.shape == (8,)
    assert np.allclose(factors[wavelength < 64 / 4], 1.0) and np.allclose(factors[wavelength > 64 / 1], 8.0)
    assert np.all((factors >= 1.0) & (factors <= 8.0))


@pytest.mark.parametrize("quant", [q for q in QUANTS if q not in ("f32", "f16")])
def test_quantised_weights_are_exactly_the_gguf_quantizers(tmp_path, quant):
    import gguf

    from sftkit.export.gguf_file import tensor_type

    folder = build_chat_model(tmp_path / "model")
    result = export(folder, tmp_path / "out", quant=quant)
    model = AutoModelForCausalLM.from_pretrained(folder)
    reloaded, _ = reload(result.path)
    got = reloaded.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, weight in model.state_dict().items():
        array = weight.float().numpy()
        qtype = tensor_type(names.get_name(name, try_suffixes=(".weight",)), array, quant)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            expected = array.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
        else:
            expected = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
        assert np.array_equal(got[name].float().numpy(), expected.astype(np.float32)), name
    assert gguf_fields(result.path)["general.file_type"] == getattr(gguf.LlamaFileType, QUANTS[quant][1])
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(result.path).tensors}
    if quant.startswith(("q5", "q4")):  # as llama.cpp's quantizer: the embedding and head stay at 8 bits
        assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == QUANTS[quant][0]


def test_adapter_is_merged_with_its_token_rows(tmp_path):
    """LoRA + trainable rows of <|im_end|>: the GGUF gives the merged model's logits, not the base's."""
    from peft import PeftModel

    base = build_chat_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    adapter = build_adapter(base, tmp_path / "run" / "adapter", trainable_token_indices=[im_end])
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    result = export(tmp_path / "run", tmp_path / "out", quant="f32")
    assert result.merged and result.path.name == "run-f32.gguf"

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    expected = logits(merged, tokenizer)
    got = logits(reload(result.path)[0], tokenizer)
    assert (got - expected).abs().max() < 1e-4
    assert (logits(AutoModelForCausalLM.from_pretrained(base), tokenizer) - expected).abs().max() > 1e-2
    embedding = reload(result.path)[0].get_input_embeddings().weight
    assert torch.allclose(embedding[im_end], merged.get_input_embeddings().weight[im_end], atol=1e-6)


def test_modelfile_has_the_stops_and_the_builtin_template_in_go_syntax(tmp_path):
    chatml = export(build_chat_model(tmp_path / "chatml"), tmp_path / "out1")
    text = (tmp_path / "out1" / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{chatml.path.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text

    custom = build_chat_model(tmp_path / "custom")
    template = (custom / "chat_template.jinja").read_text()
    (custom / "chat_template.jinja").write_text("{#- my own -#}\n" + template)
    result = export(custom, tmp_path / "out2")
    text = (tmp_path / "out2" / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and 'PARAMETER stop "<|im_end|>"' in text
    assert any("relies on the template stored in the GGUF" in note for note in result.notes)
    assert gguf_fields(result.path)["tokenizer.chat_template"] == "{#- my own -#}\n" + template


def test_vllm_writes_a_bf16_merge_or_a_servable_adapter(tmp_path):
    base = build_chat_model(tmp_path / "base")
    plain = build_adapter(base, tmp_path / "plain")
    result = export(plain, tmp_path / "lora", to="vllm", lora=True)
    assert not result.merged
    assert {p.name for p in result.files} >= {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"}
    assert any("--enable-lora" in note for note in result.notes)

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = build_adapter(
        base, tmp_path / "rows", trainable_token_indices=[tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    result = export(rows, tmp_path / "merged", to="vllm", lora=True)
    assert result.merged
    assert any("cannot serve trainable token rows" in note for note in result.notes)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert saved.dtype == torch.bfloat16
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


def test_bad_input_names_what_is_wrong_and_what_to_do(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = build_chat_model(tmp_path / "base")
    with pytest.raises(ModelError, match=r"--quant q4_k_m: the gguf package cannot produce it; choose one of f32, f16"):
        export(base, tmp_path / "o1", quant="q4_k_m")
    with pytest.raises(ExportError, match="--to onnx: unknown target; choose one of gguf, vllm"):
        export(base, tmp_path / "o1", to="onnx")  # type: ignore[arg-type]

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="already exists and is not empty; give a new or empty folder"):
        export(base, tmp_path / "full")

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (gpt2 / name).write_bytes((base / name).read_bytes())
    with pytest.raises(ModelError, match=r"this model is GPT2LMHeadModel\. Export it with `--to vllm`"):
        export(gpt2, tmp_path / "o2")

    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ExportError, match=r"no final weights .*newest checkpoint is .*checkpoint-12; finish the run"):
        export(run, tmp_path / "o3")

    llama3 = build_chat_model(tmp_path / "llama3", template="llama3")  # <|eot_id|> is no token of this vocabulary
    with pytest.raises(ModelError, match=r"ends each turn with '<\|eot_id\|>', which is not a token"):
        export(llama3, tmp_path / "o4")
    assert not any((tmp_path / "o4").glob("*.gguf*"))  # no half-written file left behind
    assert issubclass(ExportError, SftkitError) and issubclass(ModelError, SftkitError)


def test_push_to_hub_uploads_the_export_with_the_token_from_the_environment(tmp_path, monkeypatch):
    """Everything up to the network: the upload calls are patched (no network here)."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo, **kw: calls.append(("create", repo, self.token)) or f"https://hf.co/{repo}",
    )
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["folder_path"], kw["repo_id"]))
    )
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    result = export(build_chat_model(tmp_path / "model"), tmp_path / "out", push_to_hub="me/tiny-gguf")
    assert calls == [
        ("create", "me/tiny-gguf", "hf_secret_for_test"),
        ("upload", str(tmp_path / "out"), "me/tiny-gguf"),
    ]
    assert result.hub_url == "https://hf.co/me/tiny-gguf"
    for path in (tmp_path / "out").iterdir():
        assert b"hf_secret_for_test" not in path.read_bytes()


def test_push_to_hub_errors_say_what_to_check(tmp_path, monkeypatch):
    from sftkit.export.hub import upload_folder

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="no HF_TOKEN in the environment"):
        upload_folder(tmp_path, "me/x")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set, so nothing was uploaded"):
        upload_folder(tmp_path, "me/x")


def test_cli_export_prints_the_error_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from sftkit.cli import app

    base = build_chat_model(tmp_path / "base")
    result = CliRunner().invoke(app, ["export", str(base), "--quant", "q3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "error: --quant q3: the gguf package cannot produce it" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["export", str(base), "--out", str(tmp_path / "o"), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    assert json.dumps(sorted(p.name for p in (tmp_path / "o").iterdir())) == '["Modelfile", "base-q8_0.gguf"]'


@requires(LLAMA2_TOKENIZER)
def test_sentencepiece_style_tokenizer_reads_back_the_same(tmp_path):
    """Llama 2's BPE with byte fallback is written as llama.cpp's `llama` vocabulary (scores, BYTE pieces)."""
    from sftkit.data.template import resolve_chat_template
    from tests.conftest import build_tiny_llama

    folder = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    tokenizer.save_pretrained(folder)
    build_tiny_llama(folder, vocab_size=len(tokenizer))
    (folder / "chat_template.jinja").write_text(resolve_chat_template("llama2", tokenizer))
    result = export(folder, tmp_path / "out")
    reloaded = AutoTokenizer.from_pretrained(result.path.parent, gguf_file=result.path.name)
    for text in ["Hello world", " two  spaces", "[INST] What is 12 plus 30? [/INST] 42 </s>", "naïve café 日本\n\nok"]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    fields = gguf_fields(result.path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.eos_token_id  # llama2 ends a turn with </s>
