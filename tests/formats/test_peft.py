"""PEFT interop against the real PEFT and transformers: logits must agree both ways."""

import json

import numpy as np
import pytest
import torch
from conftest import TOKENS, assert_round_trip, hf_logits, mlx_logits, random_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from mlx_lora.commands.convert import convert
from mlx_lora.config import ConvertConfig, LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_for_inference, read_adapter
from mlx_lora.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, hub_id, write_peft

ATOL = 1e-4


def _peft_model(model_dir, adapter_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(hf, adapter_dir).eval()


def _wrapped(peft_model) -> set[str]:
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_exported_adapter_gives_our_logits_in_peft(hf_models, arch, tmp_path):
    ours = random_adapter(
        hf_models[arch], tmp_path / "ours", LoRAConfig(targets="all-linear", layers="1,3", rank=4, alpha=8)
    )
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["bias"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        8.0,
        "none",
    )
    assert config["layers_to_transform"] == [1, 3] and config["base_model_name_or_path"] == str(
        hf_models[arch].resolve()
    )
    peft_model = _peft_model(hf_models[arch], tmp_path / "peft")
    assert _wrapped(peft_model) == set(read_adapter(tmp_path / "ours")[0].modules)
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), mlx_logits(ours.model, TOKENS), atol=ATOL, rtol=0)


def test_exported_gemma_adapter_gives_our_logits_in_peft(hf_models, tmp_path, monkeypatch):
    """mlx-lm's gemma MLP uses the exact GELU where transformers uses the tanh approximation (bases
    differ by ~7e-4); with mlx's tanh GELU (nn.gelu_approx) the two bases agree and so must the adapters."""
    import mlx.nn

    monkeypatch.setattr(mlx.nn, "gelu", mlx.nn.gelu_approx)
    ours = random_adapter(
        hf_models["gemma"], tmp_path / "ours", LoRAConfig(targets="all-linear", layers="0,2", rank=4, alpha=8)
    )
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    peft_model = _peft_model(hf_models["gemma"], tmp_path / "peft")
    assert _wrapped(peft_model) == set(read_adapter(tmp_path / "ours")[0].modules)
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), mlx_logits(ours.model, TOKENS), atol=ATOL, rtol=0)


def test_uneven_selection_exports_as_a_regex_that_peft_matches_exactly(llama, tmp_path):
    cfg = LoRAConfig(targets=r"model\.layers\.1\.self_attn\.q_proj|model\.layers\.2\.mlp\.down_proj", rank=2, alpha=3)
    ours = random_adapter(llama, tmp_path / "ours", cfg)
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())["layers_to_transform"] is None
    peft_model = _peft_model(llama, tmp_path / "peft")
    assert _wrapped(peft_model) == {"model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"}
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), mlx_logits(ours.model, TOKENS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_adapter_trained_with_peft_loads_as_is(hf_models, arch, tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(hf_models[arch], dtype=torch.float32)
    targets = ["qkv_proj", "down_proj"] if arch == "phi3" else ["q_proj", "v_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=targets, layers_to_transform=[0, 2], task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor([TOKENS, TOKENS[::-1]])
    for _ in range(3):  # a few real training steps so B is no longer zero
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    assert (tmp_path / "peft" / PEFT_WEIGHTS).is_file()
    base = load_for_inference(None, str(tmp_path / "peft"))  # base found from base_model_name_or_path
    np.testing.assert_allclose(mlx_logits(base.model, TOKENS), hf_logits(peft_model, TOKENS), atol=ATOL, rtol=0)
    config = read_adapter(tmp_path / "peft")[0]
    assert (config.lora.rank, config.lora.alpha, config.layers, config.base_fingerprint) == (4, 16.0, [0, 2], None)


def test_round_trip_through_peft_is_bit_identical(llama, tmp_path):
    random_adapter(
        llama, tmp_path / "ours", LoRAConfig(targets="q_proj,v_proj,up_proj", num_layers=3, rank=4, alpha=12)
    )
    assert_round_trip(tmp_path / "ours", "peft", tmp_path)


def test_peft_options_we_do_not_compute_are_refused(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", LoRAConfig(num_layers=1, rank=2))
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    path = tmp_path / "peft" / PEFT_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_bias": True}))
    with pytest.raises(UserError, match=r"lora_bias \(LoRA bias terms\)"):
        read_adapter(tmp_path / "peft")


def test_module_missing_from_the_transformers_checkpoint_is_refused(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", LoRAConfig(num_layers=1, rank=2))
    config, weights = read_adapter(tmp_path / "ours")
    names = {"model.layers.3.self_attn.q_proj.weight"}  # as if mlx-lm had renamed v_proj
    with pytest.raises(UserError, match="model.layers.3.self_attn.v_proj: no such weight in the base checkpoint"):
        write_peft(tmp_path / "peft", config, weights, "x", names)
    assert not (tmp_path / "peft").exists()


def test_mlx_quantized_base_is_recorded_as_the_model_it_was_converted_from(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization": {"bits": 4, "group_size": 64}})
    )
    (tmp_path / "README.md").write_text(
        "---\nbase_model: meta-llama/Llama-3.2-1B-Instruct\ntags:\n- mlx\n---\n# card\n"
    )
    assert hub_id(tmp_path, "mlx-community/Llama-3.2-1B-Instruct-4bit") == "meta-llama/Llama-3.2-1B-Instruct"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert hub_id(tmp_path, "org/full-precision") == "org/full-precision"
