"""--compute-dtype at load: a half-precision base computes in float32 on the CPU, every command that
runs it follows, what it saves keeps its dtype, and a quantized base is left as it is."""

import mlx.core as mx
import pytest
from conftest import make_hf_model, save_random_adapter
from mlx.utils import tree_flatten
from mlx_lm.convert import convert
from mlx_lm.utils import load_model

from mlx_lora.commands.fuse import fuse
from mlx_lora.config import FuseConfig, GenerateConfig, LoRAConfig
from mlx_lora.formats.gguf import write_gguf
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.inference.adapter_set import load_adapters
from mlx_lora.model.base import load_base

LORA = LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8)


def _dtypes(model) -> dict[str, mx.Dtype]:
    return {k: v.dtype for k, v in tree_flatten(model.parameters())}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("bf16") / "m", "llama", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_base_computes_in_float32_on_the_cpu(tmp_path, dtype):
    path = make_hf_model(tmp_path / dtype, "llama", dtype=dtype)
    stored, auto = load_base(str(path)), load_base(str(path), compute="auto")
    assert set(_dtypes(stored.model).values()) == {getattr(mx, dtype)}
    assert set(_dtypes(auto.model).values()) == {mx.float32}
    assert auto.precision.stored == getattr(mx, dtype) and auto.precision.compute == mx.float32
    want = dict(tree_flatten(stored.model.parameters()))
    assert all(mx.array_equal(v, want[k].astype(mx.float32)).item() for k, v in tree_flatten(auto.model.parameters()))
    down = load_base(str(path), compute=dtype)  # asked for the stored dtype: nothing cast
    assert set(_dtypes(down.model).values()) == {getattr(mx, dtype)} and not down.precision.cast


def test_a_float16_gguf_base_computes_in_float32(llama, tmp_path):
    base = load_base(str(llama))
    write_gguf(tmp_path / "f16.gguf", dict(tree_flatten(base.model.parameters())), base.config, llama, "f16")
    gguf = load_base(str(tmp_path / "f16.gguf"), compute="auto")
    assert gguf.precision.stored == mx.float16 and set(_dtypes(gguf.model).values()) == {mx.float32}


def test_a_quantized_base_is_left_as_it_is(llama, tmp_path):
    convert(str(llama), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16")
    stored, auto = load_base(str(tmp_path / "q4")), load_base(str(tmp_path / "q4"), compute="auto")
    assert mx.bfloat16 in set(_dtypes(stored.model).values())
    assert _dtypes(auto.model) == _dtypes(stored.model) and not auto.precision.cast
    assert auto.precision.why == "a quantized base computes in its scales' dtype"


def test_generate_and_eval_follow_the_policy(bf16, tmp_path):
    save_random_adapter(bf16, tmp_path / "ad", LORA, seed=1)
    generating = load_adapters(GenerateConfig(model=str(bf16), adapter_path=[str(tmp_path / "ad")]))
    evaluating = load_for_inference(str(bf16), str(tmp_path / "ad"), "auto")
    for base in (generating.base, evaluating):
        assert set(_dtypes(base.model).values()) == {mx.float32}


def test_fuse_of_a_bf16_base_saves_bf16_as_without_the_policy(bf16, tmp_path):
    save_random_adapter(bf16, tmp_path / "ad", LORA, seed=1)
    said = []
    for dtype in ("auto", "bfloat16"):
        cfg = FuseConfig(adapter_path=str(tmp_path / "ad"), save_path=str(tmp_path / dtype), compute_dtype=dtype)
        fuse(cfg, log=said.append)
    auto, stored = (dict(tree_flatten(load_model(tmp_path / d)[0].parameters())) for d in ("auto", "bfloat16"))
    assert {v.dtype for v in auto.values()} == {mx.bfloat16}
    # the merge runs in float32 either way: the same files, bit for bit
    assert auto.keys() == stored.keys() and all(mx.array_equal(auto[k], stored[k]).item() for k in auto)
