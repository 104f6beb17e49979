"""DoRA, rsLoRA, --init and per-module rank/alpha: checked against PEFT's own layers and by logits."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key

from mlx_lora.config import LoRAConfig, TrainConfig, build_config, load_yaml, pattern_key
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS, describe, save_adapter
from mlx_lora.model.base import load_base
from mlx_lora.model.initialization import initialize
from mlx_lora.model.lora import LoRALinear, apply_lora, fuse_lora, lora_layers

TOKENS = mx.array([[1, 50, 51, 52, 53, 54, 55]])


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _peft_layer(base: nn.Linear, **options):
    """PEFT wrapping a torch copy of `base` (weights copied before any init runs)."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            out_dims, in_dims = base.weight.shape
            self.proj = torch.nn.Linear(in_dims, out_dims, bias="bias" in base)
            self.proj.weight.data = torch.tensor(_np(base.weight))
            if "bias" in base:
                self.proj.bias.data = torch.tensor(_np(base.bias))

        def forward(self, x):
            return self.proj(x)

    return get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], **options)).base_model.model.proj


def _copy_into_peft(ours: LoRALinear, theirs) -> None:
    theirs.lora_A["default"].weight.data = torch.tensor(_np(ours.lora_a.T))
    theirs.lora_B["default"].weight.data = torch.tensor(_np(ours.lora_b.T))
    if ours.dora:
        theirs.lora_magnitude_vector["default"].weight.data = torch.tensor(_np(ours.magnitude))


@pytest.mark.parametrize("dora, rslora", [(False, False), (True, False), (False, True), (True, True)])
def test_forward_gradients_and_fuse_match_peft(dora, rslora):
    mx.random.seed(0)
    base = nn.Linear(48, 24, bias=True)
    rank, alpha = 4, 6.0
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    layer = LoRALinear(base, rank, scale, dora=dora)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.2
    if dora:
        layer.magnitude = layer.magnitude * (1 + 0.3 * mx.random.normal(layer.magnitude.shape))
    peft = _peft_layer(base, r=rank, lora_alpha=alpha, use_dora=dora, use_rslora=rslora)
    assert peft.scaling["default"] == pytest.approx(scale)
    _copy_into_peft(layer, peft)
    x = mx.random.normal((3, 5, 48))
    tx = torch.tensor(_np(x))
    np.testing.assert_allclose(_np(layer(x)), peft(tx).detach().numpy(), atol=2e-5)

    # Gradients too: PEFT keeps ||W + ΔW|| out of the graph, and so must we.
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"] + (["magnitude"] if dora else []), recurse=False)
    grads = nn.value_and_grad(layer, lambda m, x: (m(x) ** 2).sum())(layer, x)[1]
    (peft(tx) ** 2).sum().backward()
    np.testing.assert_allclose(_np(grads["lora_a"]).T, peft.lora_A["default"].weight.grad.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(_np(grads["lora_b"]).T, peft.lora_B["default"].weight.grad.numpy(), rtol=1e-3, atol=1e-3)
    if dora:
        theirs = peft.lora_magnitude_vector["default"].weight.grad.numpy()
        np.testing.assert_allclose(_np(grads["magnitude"]), theirs, rtol=1e-3, atol=1e-3)

    peft.merge(safe_merge=True)
    np.testing.assert_allclose(_np(layer.fuse().weight), peft.base_layer.weight.detach().numpy(), atol=1e-5)


def test_gaussian_init_is_peft_s():
    mx.random.seed(2)
    layer = LoRALinear(nn.Linear(512, 256), rank=8, scale=2.0)
    initialize(layer, "gaussian")
    assert abs(np.std(_np(layer.lora_a)) - 1 / 8) < 0.01  # PEFT: normal with std 1/r
    assert abs(np.mean(_np(layer.lora_a))) < 0.01 and mx.all(layer.lora_b == 0).item()


@pytest.mark.parametrize("method", ["olora", "pissa"])
@pytest.mark.parametrize("shape", [(24, 48), (48, 24)])
def test_olora_and_pissa_start_like_peft_and_leave_the_layer_unchanged(method, shape):
    mx.random.seed(3)
    out_dims, in_dims = shape
    base = nn.Linear(in_dims, out_dims, bias=False)
    w = base.weight
    layer = LoRALinear(base, rank=4, scale=2.0)
    peft = _peft_layer(layer.linear, r=4, lora_alpha=8, init_lora_weights=method)
    initialize(layer, method)
    ours_ab = _np(layer.lora_b.T @ layer.lora_a.T)  # (out, in) = B0 A0 in PEFT's layout
    theirs_ab = (peft.lora_B["default"].weight @ peft.lora_A["default"].weight).detach().numpy()
    np.testing.assert_allclose(ours_ab, theirs_ab, atol=1e-4)  # products: singular vectors' signs may differ
    np.testing.assert_allclose(_np(layer.linear.weight), peft.base_layer.weight.detach().numpy(), atol=1e-5)
    assert mx.allclose(layer.linear.weight + layer.delta(), w, atol=1e-5)  # W_res + ΔW0 = W
    assert not mx.allclose(layer.linear.weight, w, atol=1e-2)


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(targets="q_proj,v_proj", rank=4, alpha=8, init="pissa", num_layers=-1),
        LoRAConfig(targets="all-linear", rank=2, alpha=4, init="olora", dora=True, num_layers=2),
        LoRAConfig(
            targets="q_proj,v_proj,down_proj",
            rank=4,
            alpha=8,
            init="pissa",
            rslora=True,
            dora=True,
            rank_pattern=".*v_proj=8",
            alpha_pattern="down_proj=3",
        ),
    ],
    ids=["pissa", "olora+dora", "pissa+dora+rslora+patterns"],
)
def test_base_changing_init_is_saved_exactly_for_the_unmodified_base(llama, tmp_path, cfg):
    mx.random.seed(4)
    trained = load_base(str(llama))
    base_logits = trained.model(TOKENS)
    modules = apply_lora(trained.model, cfg)
    assert mx.allclose(trained.model(TOKENS), base_logits, atol=1e-4)  # W_res + ΔW0 = W
    for layer in lora_layers(trained.model).values():  # what training would do: move A, B and m
        layer.lora_a = layer.lora_a + 0.05 * mx.random.normal(layer.lora_a.shape)
        layer.lora_b = layer.lora_b + 0.05 * mx.random.normal(layer.lora_b.shape)
        if layer.dora:
            layer.magnitude = layer.magnitude * 1.1
    in_training = trained.model(TOKENS)
    assert not mx.allclose(in_training, base_logits, atol=1e-2)
    save_adapter(tmp_path, trained.model, describe(trained, cfg, modules))

    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    grow = math.sqrt(2) if cfg.rslora else 2
    assert (saved["init"], saved["trained_init"], saved["rank"]) == ("default", cfg.init, 2 * cfg.rank)
    assert saved["alpha"] == pytest.approx(cfg.alpha * grow)
    fresh = load_base(str(llama))  # the unmodified base
    load_adapter(fresh, tmp_path)
    for path, layer in lora_layers(fresh.model).items():
        rank, alpha = cfg.rank_alpha(path)
        assert layer.lora_a.shape[1] == 2 * rank
        assert layer.scale == pytest.approx(alpha / (math.sqrt(rank) if cfg.rslora else rank))
    np.testing.assert_allclose(_np(fresh.model(TOKENS)), _np(in_training), atol=1e-4)
    fuse_lora(fresh.model)
    np.testing.assert_allclose(_np(fresh.model(TOKENS)), _np(in_training), atol=1e-4)


def test_patterns_give_each_module_its_rank_and_alpha_first_match_wins(llama, tmp_path):
    cfg = LoRAConfig(
        targets="q_proj,v_proj,o_proj",
        num_layers=2,
        rank=8,
        alpha=16,
        rank_pattern=r".*layers\.3\.self_attn\.v_proj=2,.*v_proj=16,.*q_proj=4",
        alpha_pattern="o_proj=4",
    )
    base = load_base(str(llama))
    modules = apply_lora(base.model, cfg)
    got = {p: (l.lora_a.shape[1], l.scale) for p, l in lora_layers(base.model).items()}
    assert got == {
        "model.layers.2.self_attn.q_proj": (4, 4.0),
        "model.layers.3.self_attn.q_proj": (4, 4.0),
        "model.layers.2.self_attn.v_proj": (16, 1.0),
        "model.layers.3.self_attn.v_proj": (2, 8.0),
        "model.layers.2.self_attn.o_proj": (8, 0.5),
        "model.layers.3.self_attn.o_proj": (8, 0.5),
    }
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    save_adapter(tmp_path, base.model, describe(base, cfg, modules))
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["rank_pattern"] == cfg.rank_pattern
    reloaded = load_base(str(llama))
    load_adapter(reloaded, tmp_path)
    assert mx.array_equal(reloaded.model(TOKENS), base.model(TOKENS))


@pytest.mark.parametrize("pattern", [".*v_proj", "v_proj", r"layers\.2\.self_attn\.v_proj", "proj", "self_attn.*"])
def test_pattern_matching_is_peft_s(pattern):
    for path in ("model.layers.2.self_attn.v_proj", "model.layers.12.self_attn.v_proj", "model.layers.2.mlp.up_proj"):
        theirs = get_pattern_key([pattern], path)
        assert pattern_key({pattern: 1}, path) == (pattern if theirs == pattern else None)


def test_patterns_from_yaml_mapping_equal_the_command_line_form(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank_pattern:\n  .*v_proj: 16\n  '.*layers\\.(1|2)\\.q_proj': 4\nalpha_pattern: {q_proj: 2.5}\n")
    from_file = build_config(TrainConfig, load_yaml(path), {})
    from_flags = build_config(
        TrainConfig, {}, {"rank_pattern": r".*v_proj=16,.*layers\.(1|2)\.q_proj=4", "alpha_pattern": "q_proj=2.5"}
    )
    assert from_file == from_flags
    assert from_file.rank_alpha("model.layers.1.q_proj") == (4, 2.5)
    assert from_file.rank_alpha("model.layers.9.mlp.up_proj") == (8, 16.0)


def test_bad_method_options_are_user_errors(llama):
    with pytest.raises(UserError) as e:
        build_config(TrainConfig, {}, {"init": "svd", "rank_pattern": "v_proj", "alpha_pattern": "q_proj=-1,(=2"})
    message = str(e.value)
    assert "--init must be one of default, gaussian, olora, pissa" in message
    assert "--rank-pattern 'v_proj' is not a list of regex=number items" in message
    assert "q_proj=-1 must be a positive number" in message and "'(' is not a valid regular expression" in message
    with pytest.raises(UserError, match="--rank-pattern: .*k_proj matches none of the adapted modules"):
        apply_lora(load_base(str(llama)).model, LoRAConfig(rank_pattern=".*k_proj=4"))
    with pytest.raises(UserError, match="rank 64 is larger than .*v_proj allows"):
        apply_lora(load_base(str(llama)).model, LoRAConfig(rank_pattern="v_proj=64"))


@pytest.mark.slow
def test_train_generate_fuse_with_every_method(llama, tiny_data, tmp_path):
    """A short real run: the adapter it saves gives, on the unmodified base, the loss training ended on."""
    from typer.testing import CliRunner

    from mlx_lora.cli import app
    from mlx_lora.data.examples import load_dataset
    from mlx_lora.formats.loader import load_for_inference
    from mlx_lora.training.loop import train
    from mlx_lora.training.validation import mean_loss as evaluate

    out = tmp_path / "adapters"
    cfg = build_config(
        TrainConfig,
        {},
        dict(
            model=str(llama),
            data=str(tiny_data),
            adapter_path=str(out),
            iters=4,
            batch_size=2,
            learning_rate=1e-2,
            val_batches=2,
            save_every=0,
            targets="q_proj,v_proj,down_proj",
            num_layers=2,
            rank=4,
            dora=True,
            rslora=True,
            init="pissa",
            rank_pattern=".*v_proj=8",
            alpha_pattern="down_proj=4",
        ),
    )
    result = train(cfg, log=lambda s: None)
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (saved["dora"], saved["rslora"], saved["trained_init"], saved["rank"]) == (True, True, "pissa", 8)
    assert saved["rank_pattern"] == ".*v_proj=16" and saved["alpha_pattern"] == f"down_proj={4 * math.sqrt(2)!r}"
    assert any(k.endswith(".magnitude") for k in mx.load(str(out / ADAPTER_WEIGHTS)))

    base = load_for_inference(None, str(out))
    valid = load_dataset(tiny_data, base.tokenizer, cfg.max_seq_length, cfg.train_on_prompt, log=lambda s: None)[
        "valid"
    ]
    assert result.val_losses[4] != pytest.approx(result.val_losses[0], abs=1e-3)
    assert evaluate(base.model, valid, cfg.batch_size, cfg.val_batches) == pytest.approx(result.val_losses[4], abs=1e-4)

    runner = CliRunner()
    generated = runner.invoke(app, ["generate", "--adapter-path", str(out), "--max-tokens", "3"])
    assert generated.exit_code == 0, generated.output
    fused = runner.invoke(app, ["fuse", "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")])
    assert fused.exit_code == 0 and "fused model saved" in fused.output, fused.output


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(
            targets="q_proj,v_proj,down_proj",
            num_layers=2,
            rank=4,
            alpha=8,
            dora=True,
            rslora=True,
            rank_pattern=".*v_proj=8",
            alpha_pattern="down_proj=3",
        ),
        LoRAConfig(targets="q_proj,v_proj", num_layers=-1, rank=4, alpha=8, dora=True, init="olora"),
    ],
    ids=["dora+rslora+patterns", "olora+dora"],
)
def test_exported_to_peft_gives_real_peft_the_same_model_and_comes_back_bit_identical(llama, tmp_path, cfg):
    from conftest import TOKENS as ROW
    from conftest import assert_round_trip, hf_logits, mlx_logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_lora.commands.convert import convert
    from mlx_lora.config import ConvertConfig

    mx.random.seed(5)
    ours = load_base(str(llama))
    modules = apply_lora(ours.model, cfg)
    for layer in lora_layers(ours.model).values():  # as if trained
        layer.lora_b = layer.lora_b + 0.1 * mx.random.normal(layer.lora_b.shape)
        layer.magnitude = layer.magnitude * (1 + 0.1 * mx.random.normal(layer.magnitude.shape))
    save_adapter(tmp_path / "ours", ours.model, describe(ours, cfg, modules))
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["use_dora"] is True and exported.get("use_rslora", False) == cfg.rslora
    assert exported.get("rank_pattern", {}) == ({".*v_proj": 8} if cfg.rank_pattern else {})

    hf = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(hf_logits(peft, ROW), mlx_logits(ours.model, ROW), atol=1e-4, rtol=0)
    assert_round_trip(tmp_path / "ours", "peft", tmp_path)


def test_dora_rslora_pattern_adapter_made_by_peft_loads_as_is(llama, tmp_path):
    from conftest import TOKENS as ROW
    from conftest import hf_logits, mlx_logits
    from transformers import AutoModelForCausalLM

    from mlx_lora.formats.loader import load_for_inference

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    options = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        use_rslora=True,
        rank_pattern={"v_proj": 8},
        alpha_pattern={".*layers\\.0\\..*": 2},
        init_lora_weights=False,
    )
    peft = get_peft_model(hf, options).eval()  # init_lora_weights=False: random B, as if trained
    for name, param in peft.named_parameters():
        if "lora_magnitude_vector" in name:
            param.data *= 1.1
    peft.save_pretrained(str(tmp_path))
    base = load_for_inference(str(llama), str(tmp_path))
    layers = lora_layers(base.model)
    assert layers["model.layers.0.self_attn.v_proj"].lora_a.shape[1] == 8
    assert layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2 / math.sqrt(4))
    assert layers["model.layers.1.self_attn.v_proj"].scale == pytest.approx(8 / math.sqrt(8))
    np.testing.assert_allclose(mlx_logits(base.model, ROW), hf_logits(peft, ROW), atol=1e-4, rtol=0)


def test_mlx_lm_export_refuses_what_its_format_cannot_hold(llama, tmp_path):
    from conftest import random_adapter

    from mlx_lora.commands.convert import convert
    from mlx_lora.config import ConvertConfig

    random_adapter(llama, tmp_path / "ours", LoRAConfig(num_layers=1, dora=True, rank_pattern="v_proj=4"))
    with pytest.raises(UserError, match="cannot hold per-module ranks as mlx-lora computes them"):
        convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "mlxlm"), to="mlx-lm"), log=lambda _: None)
    assert not (tmp_path / "mlxlm").exists()
