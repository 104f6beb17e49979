"""LoRA on mixture-of-experts blocks: --targets reaches mlx-lm's stacked experts (one pair per
expert, as mlx-lm's LoRASwitchLinear), all-linear leaves the routers alone, and the adapter
trains, fuses exactly, converts to mlx-lm's format and is refused by PEFT's in one line."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear as MlxLmLoRASwitchLinear

from mlx_lora.config import ConvertConfig, FuseConfig, LoRAConfig, TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base, load_mlx_model
from mlx_lora.model.lora import LoRASwitchLinear, select_targets
from tests.conftest import TOKENS, fp32_tol, make_hf_model, mlx_logits

BLOCK = {"qwen3_moe": "model.layers.3.mlp", "mixtral": "model.layers.3.block_sparse_moe"}
UP = {"qwen3_moe": "mlp.experts.up_proj", "mixtral": "block_sparse_moe.experts.w3"}  # Hugging Face's names


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_hf_model(root / arch, arch) for arch in BLOCK}


@pytest.mark.parametrize("arch", list(BLOCK))
def test_targets_reach_experts_and_all_linear_leaves_routers(arch, moe_models):
    model = load_base(str(moe_models[arch])).model
    block = BLOCK[arch]
    experts = [f"{block}.switch_mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    all_linear = select_targets(model, LoRAConfig(targets="all-linear", num_layers=1))
    assert f"{block}.gate" not in all_linear and set(experts) <= set(all_linear)
    for targets in (UP[arch], "switch_mlp.up_proj", rf".*\.{UP[arch].replace('.', '[.]')}"):
        assert select_targets(model, LoRAConfig(targets=targets, num_layers=1)) == [experts[2]], targets
    assert select_targets(model, LoRAConfig(targets="gate", num_layers=1)) == [f"{block}.gate"]  # asked by name
    with pytest.raises(UserError, match=r"'experts.nope' matches no linear module.*experts\."):
        select_targets(model, LoRAConfig(targets="experts.nope", num_layers=1))


@pytest.mark.parametrize("sort", [False, True])
def test_expert_lora_equals_mlx_lm(sort):
    """Ours and mlx-lm's LoRASwitchLinear hold the same pairs transposed, and compute the same y;
    the fused SwitchLinear (W + delta()) computes it too."""
    mx.random.seed(0)
    base = SwitchLinear(64, 32, 4, bias=False)
    ours = LoRASwitchLinear(base, rank=3, scale=2.5)
    ours.lora_b = mx.random.normal(ours.lora_b.shape)
    theirs = MlxLmLoRASwitchLinear.from_base(base, r=3, scale=2.5)
    theirs.lora_a, theirs.lora_b = ours.lora_a.swapaxes(-1, -2), ours.lora_b.swapaxes(-1, -2)
    x = mx.random.normal((12, 1, 1, 64))  # tokens, as SwitchGLU expands them
    indices = mx.sort(mx.random.randint(0, 4, (12, 2)).flatten()).reshape(12, 2) if sort else mx.array([[0, 3]] * 12)
    want = theirs(x, indices, sorted_indices=sort)
    # sums of 64 products, then of 3
    tol = fp32_tol(64 + 3) * mx.abs(want).max().item()
    assert mx.abs(ours(x, indices, sorted_indices=sort) - want).max().item() <= tol
    assert mx.abs(ours.fuse()(x, indices, sorted_indices=sort) - want).max().item() <= tol


@pytest.mark.parametrize("arch", list(BLOCK))
def test_moe_adapter_trains_fuses_and_converts(arch, moe_models, tiny_data, tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    from mlx_lora.commands.convert import convert
    from mlx_lora.commands.fuse import fuse
    from mlx_lora.formats.loader import load_for_inference
    from mlx_lora.training.loop import train

    run = tmp_path / "run"
    cfg = TrainConfig(
        model=str(moe_models[arch]),
        data=str(tiny_data),
        adapter_path=str(run),
        iters=12,
        batch_size=4,
        num_layers=2,
        rank=4,
        targets="all-linear",
        learning_rate=1e-2,
    )
    losses = train(cfg, log=lambda _: None).losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    adapted = mlx_logits(load_for_inference(None, str(run)).model, TOKENS)
    assert np.abs(adapted - mlx_logits(load_base(str(moe_models[arch])).model, TOKENS)).max() > 1e-3  # it moved

    fuse(FuseConfig(adapter_path=str(run), save_path=str(tmp_path / "fused")), log=lambda _: None)
    fused = mlx_logits(load_base(str(tmp_path / "fused")).model, TOKENS)
    # longest sums: the experts' 128-wide (Mixtral) inner dimension, through 2 adapted blocks
    assert np.abs(fused - adapted).max() <= fp32_tol(2 * 128) * np.abs(adapted).max()

    convert(ConvertConfig(str(run), str(tmp_path / "mlxlm"), to="mlx-lm"), log=lambda _: None)
    theirs = load_adapters(load_mlx_model(moe_models[arch])[0], str(tmp_path / "mlxlm"))  # mlx-lm's own LoRA
    theirs.eval()
    assert np.abs(mlx_logits(theirs, TOKENS) - adapted).max() <= fp32_tol(2 * 128) * np.abs(adapted).max()

    with pytest.raises(UserError, match=r"^\S+switch_mlp\.\w+: LoRA on stacked experts .*--to mlx-lm.*fuse"):
        convert(ConvertConfig(str(run), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    assert not (tmp_path / "peft").exists()
