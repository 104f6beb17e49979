"""--compute-dtype: on the CPU a bfloat16 base trains in float32, as the same weights stored in
float32 do; what it saves keeps the base's dtype; a base too large in float32 falls back or streams."""

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import pytest
from conftest import make_hf_model
from mlx.utils import tree_flatten

import mlx_lora.training.memory as memory
from mlx_lora.config import TrainConfig
from mlx_lora.formats.native import ADAPTER_WEIGHTS
from mlx_lora.training.loop import build_run, train


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """A random llama in bfloat16 and the same weights, up-cast exactly, stored in float32."""
    root = tmp_path_factory.mktemp("dtypes")
    half = make_hf_model(root / "bf16", "llama", dtype="bfloat16")
    full = root / "fp32"
    shutil.copytree(half, full)
    weights = mx.load(str(half / "model.safetensors"))
    mx.save_safetensors(str(full / "model.safetensors"), {k: v.astype(mx.float32) for k, v in weights.items()})
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32", "dtype": "float32"}))
    return {"bf16": half, "fp32": full}


def _config(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), adapter_path=str(out), iters=3, batch_size=2, rank=4)
    return TrainConfig(**(base | dict(num_layers=2, learning_rate=1e-2, val_every=0, save_every=0) | kw))


def test_a_bf16_base_trains_as_its_fp32_copy_and_saves_as_before(bases, tiny_data, tmp_path):
    said = []
    half = train(_config(bases["bf16"], tiny_data, tmp_path / "auto"), log=said.append)
    full = train(_config(bases["fp32"], tiny_data, tmp_path / "fp32"), log=lambda _: None)
    stored = train(_config(bases["bf16"], tiny_data, tmp_path / "bf16", compute_dtype="bfloat16"), log=lambda _: None)
    assert any(s.startswith("compute: bfloat16, computed in float32 (a bfloat16 base on the CPU") for s in said)
    # the same float32 weights through the same ops and shapes: equal up to the order of a BLAS
    # sum (1.2e-7 per term over at most 2 x 32 x 256 terms); in bfloat16 they differ by ~1e-2
    assert half.losses == pytest.approx(full.losses, rel=2 * 32 * 256 * 1.2e-7)
    assert stored.losses != pytest.approx(full.losses, rel=2 * 32 * 256 * 1.2e-7)
    got, want = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("auto", "bf16"))
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}  # the policy saves as before


def test_a_base_too_large_in_fp32_streams_or_computes_in_bf16(bases, tiny_data, tmp_path, monkeypatch):
    plans = []
    real = memory.choose_streaming
    monkeypatch.setattr(memory, "choose_streaming", lambda *a: plans.append(a[1]) or real(*a))
    for dtype in ("float32", "bfloat16"):
        build_run(_config(bases["bf16"], tiny_data, tmp_path / dtype, compute_dtype=dtype), log=lambda _: None)
    full, half = plans
    lora = half.in_memory.trainable // 4  # the LoRA weights, float32 either way, among the weights
    assert full.in_memory.weights - lora == 2 * (half.in_memory.weights - lora)  # the base's: twice the bytes
    assert half.in_memory.total < full.streamed_peak < full.in_memory.total
    monkeypatch.setattr(memory, "available_bytes", lambda: (full.streamed_peak + full.in_memory.total) // 2)
    said = []
    run = build_run(_config(bases["bf16"], tiny_data, tmp_path / "auto"), log=said.append)
    assert any(s.startswith("memory: streaming the frozen blocks from disk (the whole model would") for s in said)
    assert {v.dtype for _, v in tree_flatten(run.base.model.parameters())} == {mx.float32}
    monkeypatch.setattr(memory, "available_bytes", lambda: (half.in_memory.total + full.streamed_peak) // 2)
    said = []
    run = build_run(_config(bases["bf16"], tiny_data, tmp_path / "off", stream_prefix="off"), log=said.append)
    warned = said.index(
        "warning: computing in bfloat16, several times slower on the CPU than float32, which would not fit here"
    )
    assert said[warned + 1].startswith("compute: bfloat16 (in float32 it would need about")
    frozen = {v.dtype for k, v in tree_flatten(run.base.model.parameters()) if "lora_" not in k}
    assert frozen == {mx.bfloat16}
    with pytest.raises(memory.UserError, match=r"^this run needs about"):  # asked for float32: no fallback
        build_run(
            replace(_config(bases["bf16"], tiny_data, tmp_path / "f32"), compute_dtype="float32", stream_prefix="off"),
            log=lambda _: None,
        )
