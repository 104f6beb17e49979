"""The Ollama Modelfile beside an exported GGUF: TEMPLATE only for a family mapped exactly, the
model's own stops, ADAPTER for `convert --to gguf`; and llama.cpp's chat completion on the fused GGUF
(template from its metadata) stops at end-of-turn."""

from pathlib import Path

import llama_cpp
import pytest
from conftest import CFG_A, trained_adapter
from transformers import AutoTokenizer
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.formats.modelfile import MODELFILE, chat_family

TEMPLATES = Path(__file__).parent.parent / "data" / "chat_templates"  # real templates, SOURCES.md there
CHATML, LLAMA3 = ("<|im_start|>", "<|im_end|>", []), ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>"])
GEMMA, PHI3 = ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]), ("<s>", "<|endoftext|>", ["<|end|>"])
FAMILIES = {"smollm2": CHATML, "qwen2_5": CHATML, "qwen3": CHATML, "llama3": LLAMA3, "llama3_1": LLAMA3}
FAMILIES |= {"llama3_2": LLAMA3, "gemma": GEMMA, "gemma3": GEMMA, "phi3": PHI3, "phi3_5": PHI3}
EXPECTED = {"smollm2": "ChatML", "qwen2_5": "ChatML", "qwen3": "ChatML", "llama3": "Llama 3", "gemma": "Gemma"}
UNMAPPED = ("llama3_1", "llama3_2", "gemma3", "phi3", "phi3_5")  # a date system block, a folded system, <|end|>


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", sorted(EXPECTED) + list(UNMAPPED))
def test_only_templates_a_go_template_renders_exactly_are_mapped(smollm2_tokenizer, family):
    bos, eos, others = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": others})
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    found = chat_family(tok)
    assert (found[0].name if found else None) == EXPECTED.get(family)
    if family == "smollm2":
        assert found[1].startswith("You are a helpful AI assistant named SmolLM")


@pytest.mark.once
@pytest.mark.slow
def test_fused_gguf_has_a_modelfile_and_llama_cpp_chat_stops_at_end_of_turn(smollm2_gguf, tmp_path):
    trained_adapter(smollm2_gguf, tmp_path / "adapter", CFG_A, size=0.0)  # B = 0: the base's own answers
    out = tmp_path / "fused"
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", out, "--export-gguf")
    assert result.exit_code == 0, result.output
    lines = (out / MODELFILE).read_text().splitlines()
    assert lines[0] == "FROM ./model.gguf" and 'PARAMETER stop "<|im_end|>"' in lines
    assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') for line in lines)
    assert any(line.startswith('SYSTEM """You are a helpful AI assistant named SmolLM') for line in lines)
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=512, verbose=False)  # its metadata's template
    answer = llm.create_chat_completion(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=200, temperature=0
    )
    llm.close()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] < 200, answer
    assert "<|im_end|>" not in choice["message"]["content"] and "<|im_start|>" not in choice["message"]["content"]


def test_convert_to_gguf_writes_a_modelfile_with_the_adapter(llama, tmp_path):
    trained_adapter(llama, tmp_path / "ours")
    assert _run("convert", "--to", "gguf", tmp_path / "ours", tmp_path / "gguf").exit_code == 0
    lines = (tmp_path / "gguf" / MODELFILE).read_text().splitlines()
    assert lines[:2] == [f"FROM {llama.resolve()}", "ADAPTER ./adapter.gguf"]
    assert lines[2].startswith("# no TEMPLATE") and 'PARAMETER stop "</s>"' in lines
