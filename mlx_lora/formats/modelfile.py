"""An Ollama Modelfile beside an exported GGUF: FROM (and ADAPTER), the chat TEMPLATE and the stops.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja. A TEMPLATE is written only for a
family this module maps exactly: the tokenizer's template renders probe conversations exactly as
the family's renderer below does (a default system prompt it inserts becomes SYSTEM). For any
other template the Modelfile has no TEMPLATE and says so; Ollama then takes the template from the
GGUF's metadata (tokenizer.chat_template). The stops are the model's own (model/stops.py).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_lora import atomic
from mlx_lora.model.stops import stop_ids

MODELFILE = "Modelfile"
SYSTEM_MARK, TURNS = "mlxloraprobesystem", ("mlxloraprobeuser1", "mlxloraprobereply", "mlxloraprobeuser2")


@dataclass(frozen=True)
class Family:
    name: str
    render: Callable[[list[dict]], str]  # a conversation, ending in the generation prompt, as the family writes it
    template: str  # the same in Ollama's Go template, over .Messages (system messages included)
    bos: str  # what llama.cpp adds itself (the Jinja writes it; the Go template must not)
    system: bool = True  # whether the family has a system role


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _llama3(messages):
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _gemma(messages):
    roles = {"assistant": "model"}
    turns = "".join(
        f"<start_of_turn>{roles.get(m['role'], m['role'])}\n{m['content']}<end_of_turn>\n" for m in messages
    )
    return turns + "<start_of_turn>model\n"


FAMILIES = (
    Family(
        "ChatML",
        _chatml,
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        "",
    ),
    Family(
        "Llama 3",
        _llama3,
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|>",
    ),
    Family(
        "Gemma",
        _gemma,
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        "<bos>",
        system=False,
    ),
)


def _conversation(system: str | None) -> list[dict]:
    roles = ("user", "assistant", "user")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for r, c in zip(roles, TURNS)
    ]


def _jinja(hf, messages) -> str | None:
    try:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # the template refuses the probe (a system role, say): no match
        return None


def _default_system(family: Family, hf) -> str | None:
    """ "" when the template renders the family with no default system prompt, the prompt it inserts,
    or None when it does not render the family exactly."""
    plain = _jinja(hf, _conversation(None))
    if plain is None or not plain.startswith(family.bos):
        return None
    plain = plain[len(family.bos) :]
    if plain == family.render(_conversation(None)):
        return ""
    if not family.system:
        return None
    before, _, after = family.render(_conversation(SYSTEM_MARK)).partition(SYSTEM_MARK)
    if not (plain.startswith(before) and plain.endswith(after)):
        return None
    default = plain[len(before) : len(plain) - len(after)]
    return default if default and family.render(_conversation(default)) == plain else None


def chat_family(hf) -> tuple[Family, str] | None:
    """The family the tokenizer's template is, and its default system prompt ("" for none)."""
    if not hf.chat_template:
        return None
    for family in FAMILIES:
        default = _default_system(family, hf)
        with_system = _jinja(hf, _conversation(SYSTEM_MARK))
        # a family without a system role matches only a template that refuses one (Gemma 1 and 2;
        # Gemma 3 folds it into the first user turn, which this Go template does not)
        want = family.bos + family.render(_conversation(SYSTEM_MARK)) if family.system else None
        system_ok = with_system == want
        if default is not None and system_ok:
            return family, default
    return None


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(tokenizer, source: str, adapter: str | None = None) -> str:
    """FROM `source` (and ADAPTER `adapter`); with a tokenizer, its TEMPLATE (or why none) and stops."""
    lines = [f"FROM {source}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    if tokenizer is None:
        return "\n".join([*lines, "# TEMPLATE and stops: Ollama reads them from the base GGUF's metadata"]) + "\n"
    hf = tokenizer._tokenizer
    found = chat_family(hf)
    if found is None:
        lines.append(
            "# no TEMPLATE: this chat template is not one mlx-lora maps exactly onto an Ollama Go template "
            f"({', '.join(f.name for f in FAMILIES)}); Ollama uses the template in the GGUF's metadata"
        )
    else:
        family, system = found
        lines.append(f"# TEMPLATE: the tokenizer's chat template is {family.name}, rendered the same way")
        lines.append(f'TEMPLATE """{family.template}"""')
        lines += [f'SYSTEM """{system}"""'] if system else []
    lines += [f"PARAMETER stop {_quoted(hf.convert_ids_to_tokens(t))}" for t in stop_ids(tokenizer)]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: Path, tokenizer, source: str, adapter: str | None = None) -> None:
    atomic.write_bytes(Path(directory) / MODELFILE, modelfile_text(tokenizer, source, adapter).encode())
