"""`mlx-lora convert` on the command line, fused models in transformers, and GGUF for llama.cpp."""

import json

import numpy as np
import pytest
import torch
from conftest import TOKENS, hf_logits, mlx_logits, random_adapter
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mlx_lora.atomic import OWNER
from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig
from mlx_lora.formats.native import ADAPTER_CONFIG
from mlx_lora.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS

CFG = LoRAConfig(targets="q_proj,v_proj,gate_proj", num_layers=2, rank=4, alpha=8)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_convert_command_writes_each_format(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", CFG)
    result = _run("convert", "--to", "peft", tmp_path / "ours", tmp_path / "peft", "--base-model-id", "org/tiny-llama")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "peft").iterdir()} - {OWNER} == {PEFT_WEIGHTS, PEFT_CONFIG}
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())["base_model_name_or_path"] == "org/tiny-llama"
    result = _run("convert", "--to", "peft", tmp_path / "peft", tmp_path / "peft2")
    assert result.exit_code == 2 and "--model org/tiny-llama: not a local directory" in result.output  # not on the hub
    assert _run("convert", "--to", "mlx-lm", tmp_path / "peft", tmp_path / "mlxlm", "--model", llama).exit_code == 0
    assert "lora_parameters" in json.loads((tmp_path / "mlxlm" / ADAPTER_CONFIG).read_text())
    assert _run("convert", "--to", "mlx", tmp_path / "mlxlm", tmp_path / "back", "--model", llama).exit_code == 0
    assert json.loads((tmp_path / "back" / ADAPTER_CONFIG).read_text())["base_model"] == "org/tiny-llama"


def test_convert_refuses_bad_input_without_writing(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", CFG)
    result = _run("convert", "--to", "onnx", tmp_path / "ours", tmp_path / "out")
    assert result.exit_code == 2 and "--to must be one of peft, mlx, mlx-lm, gguf, got 'onnx'" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = _run("convert", tmp_path / "ours", tmp_path / "busy")
    assert result.exit_code == 2 and "holds other files" in result.output
    result = _run("convert", tmp_path / "nowhere", tmp_path / "out")
    assert result.exit_code == 2 and "no adapter_config.json here" in result.output
    assert not (tmp_path / "out").exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("arch,adapter_format", [("llama", "mlx"), ("phi3", "peft"), ("qwen2", "mlx-lm")])
def test_fused_model_in_transformers_gives_our_adapter_logits(hf_models, arch, adapter_format, tmp_path):
    ours = random_adapter(
        hf_models[arch], tmp_path / "ours", LoRAConfig(targets="all-linear", num_layers=2, rank=4, alpha=8)
    )
    assert _run("convert", "--to", adapter_format, tmp_path / "ours", tmp_path / "adapter").exit_code == 0
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(fused, TOKENS), mlx_logits(ours.model, TOKENS), atol=1e-4, rtol=0)


def test_fuse_exports_gguf_that_the_gguf_reader_reads(llama, tmp_path):
    from gguf import GGUFReader

    random_adapter(llama, tmp_path / "ours", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "ours", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 0, result.output
    reader = GGUFReader(tmp_path / "fused" / "model.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    names = {t.name for t in reader.tensors}
    assert len(names) == len(hf.state_dict())
    assert {"token_embd.weight", "output.weight", "blk.3.attn_q.weight", "blk.0.ffn_gate.weight"} <= names
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    gate = next(t for t in reader.tensors if t.name == "blk.3.ffn_gate.weight")  # adapted, stored unpermuted
    np.testing.assert_allclose(
        np.asarray(gate.data, np.float32), hf.model.layers[3].mlp.gate_proj.weight.detach().numpy(), atol=1e-3
    )


def test_gguf_for_an_unsupported_architecture_is_refused_before_anything_is_written(hf_models, tmp_path):
    random_adapter(hf_models["gemma"], tmp_path / "ours", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "ours", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 2
    supported = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3, olmo2, smollm3"
    assert f"GGUF export supports {supported} models, not gemma" in result.output
    assert not (tmp_path / "fused").exists()


def test_converting_between_formats_reads_the_base_only_where_needed(llama, tmp_path, monkeypatch):
    from mlx_lora.formats import registry

    random_adapter(llama, tmp_path / "ours", CFG)
    assert _run("convert", "--to", "mlx-lm", tmp_path / "ours", tmp_path / "with_base").exit_code == 0
    # the same adapter naming a base that is nowhere: nothing but PEFT export needs to read it
    missing = "org/not-on-any-hub"
    assert (
        _run("convert", "--to", "mlx", tmp_path / "ours", tmp_path / "ours2", "--base-model-id", missing).exit_code == 0
    )
    result = _run("convert", "--to", "peft", tmp_path / "ours", tmp_path / "peft", "--base-model-id", missing)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(registry, "resolve_model", lambda name: pytest.fail(f"read the base {name}"))
    for to, src in (("mlx-lm", "ours2"), ("mlx", "peft"), ("mlx-lm", "with_base"), ("mlx", "with_base")):
        result = _run("convert", "--to", to, tmp_path / src, tmp_path / f"{src}-{to}")
        assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "ours2-mlx-lm" / ADAPTER_CONFIG).read_text())
    assert written["num_layers"] == json.loads((tmp_path / "with_base" / ADAPTER_CONFIG).read_text())["num_layers"] == 2
    assert json.loads((tmp_path / "with_base-mlx-lm" / ADAPTER_CONFIG).read_text())["num_layers"] == 2
    assert json.loads((tmp_path / "peft-mlx" / ADAPTER_CONFIG).read_text())["base_model"] == missing
    # our PEFT export carries our config beside its tensors, so it says the block count as well
    assert _run("convert", "--to", "mlx-lm", tmp_path / "peft", tmp_path / "peft-mlx-lm").exit_code == 0
    assert json.loads((tmp_path / "peft-mlx-lm" / ADAPTER_CONFIG).read_text())["num_layers"] == 2
