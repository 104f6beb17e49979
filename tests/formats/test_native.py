import json

import mlx.core as mx
import pytest
from conftest import trained_adapter

from mlx_lora.config import LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base

TOKENS = mx.array([[1, 50, 51, 52, 53]])


def test_saved_adapter_holds_only_lora_weights_and_a_complete_config(llama, tmp_path):
    base = trained_adapter(llama, tmp_path)
    weights = mx.load(str(tmp_path / ADAPTER_WEIGHTS))
    assert set(weights) == {
        f"model.layers.{i}.self_attn.{m}.{k}"
        for i in (2, 3)
        for m in ("q_proj", "v_proj")
        for k in ("lora_a", "lora_b")
    }
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["base_model"] == str(llama.resolve())
    assert config["layer_indices"] == [2, 3] and config["rank"] == 4 and config["alpha"] == 8 and config["scale"] == 2.0
    assert config["modules"][0] == "model.layers.2.self_attn.q_proj"
    assert config["format_version"] == 1 and len(config["base_fingerprint"]) == 16
    assert base.model(TOKENS).shape[-1] > 0


def test_reloaded_adapter_gives_identical_logits(llama, tmp_path):
    trained = trained_adapter(llama, tmp_path)
    reloaded = load_base(str(llama))
    load_adapter(reloaded, tmp_path)
    assert mx.array_equal(reloaded.model(TOKENS), trained.model(TOKENS))


def test_adapter_from_another_base_is_refused(hf_models, tmp_path):
    trained_adapter(hf_models["llama"], tmp_path)
    with pytest.raises(UserError, match="shapes differ"):
        load_adapter(load_base(str(hf_models["qwen2"])), tmp_path)


def test_corrupt_weights_are_a_user_error(llama, tmp_path):
    trained_adapter(llama, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_adapter(load_base(str(llama)), tmp_path)


def test_missing_config_is_a_user_error(llama, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(load_base(str(llama)), tmp_path)


def test_weights_and_config_from_different_saves_are_refused(llama, tmp_path):
    trained_adapter(llama, tmp_path / "a", LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8))
    trained_adapter(llama, tmp_path / "b", LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=32))
    # a save cut after the weights but before the config: same shapes, other scale
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(UserError, match="alpha, scale differ from what adapters.safetensors was saved with"):
        load_adapter(load_base(str(llama)), tmp_path / "a")
    config = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model": "/moved/base"}))
    load_adapter(load_base(str(llama)), tmp_path / "b")  # a moved base is a fair hand edit
