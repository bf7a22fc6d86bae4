"""An Ollama `Modelfile` beside the GGUF: `ollama create NAME -f OUT/Modelfile`.

Ollama renders prompts with a Go template, not with the Jinja template stored in the GGUF. Where the run
trained with one of sftkit's built-in templates, the Modelfile carries the same layout in Go syntax
(the template's text is compared with the built-in's); for any other template it carries none, and Ollama
falls back to the template it derives from the GGUF's `tokenizer.chat_template`: the file says so. The
stop parameters are the end-of-turn text and the EOS token either way.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from sftkit.data.template import BUILTIN_TEMPLATES, end_of_turn

# Go templates laying messages out as the built-in Jinja templates of the same name do; BOS is not written
# here, Ollama adds it where the GGUF says `add_bos_token`. `{eos}` is the tokenizer's EOS text.
GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "zephyr": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{eos}\n{{ end }}<|assistant|>\n",
    "mistral": (
        '{{- $system := "" }}{{- $first := true }}{{- range .Messages }}'
        '{{- if eq .Role "system" }}{{ $system = .Content }}'
        '{{- else if eq .Role "user" }}[INST] {{ if and $first $system }}{{ $system }}\n\n{{ end }}'
        "{{ .Content }}[/INST]{{ $first = false }}"
        '{{- else if eq .Role "assistant" }}{{ .Content }}{eos}{{ end }}{{ end }}'
    ),
    "llama2": (
        '{{- $system := "" }}{{- $first := true }}{{- range .Messages }}'
        '{{- if eq .Role "system" }}{{ $system = .Content }}'
        '{{- else if eq .Role "user" }}{{ if not $first }}{bos}{{ end }}[INST] '
        "{{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
        "{{ $first = false }}"
        '{{- else if eq .Role "assistant" }} {{ .Content }} {eos}{{ end }}{{ end }}'
    ),
}


def builtin_name(template: str) -> str | None:
    """The built-in template whose text `template` is, if any."""
    for name in BUILTIN_TEMPLATES:
        text = resources.files("sftkit.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")
        if text.strip() == template.strip():
            return name
    return None


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(out: Path, gguf_name: str, template: str, tokenizer: Any) -> tuple[Path, list[str]]:
    """OUT/Modelfile for the GGUF `gguf_name`; returns its path and a note on where the template comes from."""
    stops = [text for text in (end_of_turn(template, tokenizer).strip(), tokenizer.eos_token) if text]
    lines = [f"FROM ./{gguf_name}", ""]
    lines += [f"PARAMETER stop {quoted(stop)}" for stop in dict.fromkeys(stops)]
    name = builtin_name(template)
    go_template = GO_TEMPLATES.get(name or "")
    if go_template is not None:
        text = go_template.replace("{eos}", tokenizer.eos_token or "").replace("{bos}", tokenizer.bos_token or "")
        lines += ["", f"# The run's chat template ({name}) in Ollama's Go syntax.", f'TEMPLATE """{text}"""']
        note = f"Modelfile: TEMPLATE is the built-in {name} template in Ollama's syntax"
    else:
        lines += [
            "",
            "# No TEMPLATE: the run's chat template is not one of sftkit's built-ins, so Ollama uses the one",
            "# stored in the GGUF (tokenizer.chat_template). llama.cpp renders it exactly with --jinja.",
        ]
        note = "Modelfile: no TEMPLATE (custom chat template); Ollama relies on the template stored in the GGUF"
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [note]
