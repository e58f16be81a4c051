"""An Ollama Modelfile for an exported GGUF file, so that ``ollama create NAME -f FILE`` works.

Ollama renders prompts with Go templates, not with the Jinja chat template the GGUF file
carries, so the template is chosen by the chat format the Jinja template writes (its turn
markers): ChatML (SmolLM2, Qwen2), Llama 3, Mistral / Llama 2 ``[INST]``, Gemma, Phi-3.
The stop tokens are the format's turn markers and the model's EOS token; a default system
prompt the Jinja template inserts (SmolLM2's, Qwen2's) becomes ``SYSTEM``, which Ollama
prepends as the first message when a conversation has none. For a chat format not in
``CHAT_FORMATS`` the Modelfile has no ``TEMPLATE``, and Ollama falls back to its own
detection from the GGUF's chat template.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

_CHATML = """\
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_LLAMA3 = """\
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
_INST = """\
{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""
_GEMMA = """\
{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""
_PHI3 = """\
{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """marker: a string only this format's Jinja template holds; template: Ollama's Go template;
    stops: the turn markers generation must stop at; system: a regex for the default system
    prompt in the Jinja source (group 1)."""

    marker: str
    template: str
    stops: tuple[str, ...]
    system: str | None = None


CHAT_FORMATS = {
    "chatml": ChatFormat(
        "<|im_start|>",
        _CHATML,
        ("<|im_start|>", "<|im_end|>"),
        system=r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]+)<\|im_end\|>",
    ),
    "llama3": ChatFormat(
        "<|start_header_id|>", _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    ),
    "gemma": ChatFormat("<start_of_turn>", _GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": ChatFormat("<|end|>", _PHI3, ("<|end|>", "<|user|>", "<|assistant|>")),
    "inst": ChatFormat("[INST]", _INST, ("[INST]", "[/INST]")),
}


def chat_format(jinja_template: str | None) -> ChatFormat | None:
    """The format whose marker the Jinja chat template holds (first in ``CHAT_FORMATS``), or None."""
    if not jinja_template:
        return None
    return next((f for f in CHAT_FORMATS.values() if f.marker in jinja_template), None)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f'Modelfile: cannot quote a text holding """: {text!r}')
    return f'"""{text}"""'


def modelfile_text(
    from_: str, jinja_template: str | None, eos_token: str | None, adapter: str | None = None
) -> str:
    """The Modelfile for a GGUF file ``from_`` (as Ollama resolves it, relative to the Modelfile)."""
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    fmt = chat_format(jinja_template)
    stops: list[str] = []
    if fmt is None:
        lines.append(
            "# no TEMPLATE: the chat format is not one jqlora knows; Ollama reads the GGUF's own"
        )
    else:
        lines.append(f"TEMPLATE {_quoted(fmt.template)}")
        found = re.search(fmt.system, jinja_template or "") if fmt.system else None
        if found:
            lines.append(f"SYSTEM {_quoted(found.group(1))}")
        stops += fmt.stops
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f"PARAMETER stop {_go_string(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def _go_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _chat_metadata(gguf_path: Path) -> tuple[str | None, str | None]:
    """(Jinja chat template, EOS token text) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    eos_id = field("tokenizer.ggml.eos_token_id")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    eos = None
    if eos_id is not None and tokens is not None:
        eos = tokens.contents(int(eos_id))
    return field("tokenizer.chat_template"), eos


def write_modelfile(model_gguf, out=None, *, adapter_gguf=None) -> Path:
    """Write an Ollama Modelfile for ``model_gguf`` (with ``ADAPTER adapter_gguf`` if given)
    to ``out``, default beside the exported file: ``NAME.gguf`` -> ``NAME.Modelfile``.

    Paths inside are relative to the Modelfile's directory when the file lies below it.
    """
    model_gguf = Path(os.fspath(model_gguf))
    exported = Path(os.fspath(adapter_gguf)) if adapter_gguf else model_gguf
    out = Path(os.fspath(out)) if out else exported.with_suffix(".Modelfile")
    template, eos = _chat_metadata(model_gguf)

    def ref(p: Path) -> str:
        try:
            return "./" + p.resolve().relative_to(out.resolve().parent).as_posix()
        except ValueError:
            return str(p.resolve())

    adapter = ref(exported) if adapter_gguf else None
    out.write_text(modelfile_text(ref(model_gguf), template, eos, adapter), encoding="utf-8")
    return out
