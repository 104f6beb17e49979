"""GGUF bases in every quantization we read: each tensor exactly what gguf-py de-quantizes it to, in
MLX's quantized form where that holds it, and the model's logits what llama.cpp computes on the
same file. Files are written by gguf-py's quantizers and by llama.cpp's own (llama_model_quantize)."""

import ctypes

import gguf
import llama_cpp
import mlx.core as mx
import numpy as np
import pytest
from conftest import TOKENS, make_hf_model, mlx_logits
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.errors import UserError
from mlx_lora.model.gguf import gguf_model
from mlx_lora.model.gguf_tensors import AFFINE, QTYPE, read_shapes, read_tensors, tensor_arrays

# llama.cpp's file types -> the tensor types they hold here (K-quants need rows of 256: hidden 256)
FILE_TYPES = {
    "Q4_K_M": {"Q4_K", "Q6_K"},
    "Q5_K_M": {"Q5_K", "Q6_K"},
    "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K", "Q6_K"},
    "Q2_K": {"Q2_K", "Q3_K", "Q6_K"},
    "Q5_0": {"Q5_0", "Q6_K"},
    "Q5_1": {"Q5_1", "Q6_K"},
    "BF16": {"BF16"},
}
# |llama.cpp - ours| on the quantized file, relative to the largest logit: both use the same weights,
# but llama.cpp rounds activations to 8 bits (Q8_K/Q8_0/Q8_1 blocks; bf16 for BF16) before each dot
# product of a quantized weight; measured 2.1e-2 (BF16) to 6.5e-2 (Q3_K_M) on this random model.
ROUNDED_ACTIVATIONS = 1e-1
# ours vs llama.cpp on the same weights written de-quantized as f32: float32 in another order (measured
# ~1e-6); bf16 computes in bfloat16 on our side (8 bits, as test_gguf.py's bf16 tolerance).
SAME_WEIGHTS = {"BF16": 5e-2}
F32 = 1e-4


def _write(path, name: str, data: np.ndarray, qtype: QTYPE):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(name, data, raw_dtype=None if qtype in (QTYPE.F32, QTYPE.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _values(arrays: dict, name: str, qtype: QTYPE) -> np.ndarray:
    """Our arrays for one tensor, de-quantized by MLX where they are MLX-quantized."""
    base = name.removesuffix(".weight")
    if f"{base}.scales" in arrays:
        args = arrays[name], arrays[f"{base}.scales"], arrays[f"{base}.biases"]
        return np.array(mx.dequantize(*args, group_size=32, bits=AFFINE[qtype][0]))
    return np.array(arrays[name].astype(mx.float32))


def _assert_exact(arrays: dict, tensor) -> None:
    """Bit-equal to gguf-py: for the affine types MLX computes scale * q + bias from the very numbers
    gguf-py multiplies (a half times a small integer is exact in float32), so both round the same sum once."""
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert np.array_equal(_values(arrays, tensor.name, tensor.tensor_type), want), tensor.name
    quantized = f"{tensor.name.removesuffix('.weight')}.scales" in arrays
    assert quantized == (tensor.tensor_type in AFFINE), tensor.name  # Q2_K, Q3_K, Q6_K, BF16: float
    if tensor.tensor_type == QTYPE.BF16:
        assert arrays[tensor.name].dtype == mx.bfloat16


def _shapes(arrays: dict) -> dict:
    return {k: (v.shape, v.dtype) for k, v in arrays.items()}


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_gguf_py_quantized_tensor_reads_exactly(type_name, tmp_path):
    qtype = QTYPE[type_name]
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    w[3] = 0.0  # a block of zeros: scale 0
    _write(tmp_path / "t.gguf", "a.weight", gguf.quants.quantize(w, qtype), qtype)
    tensor = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    ours = tensor_arrays(tensor)
    _assert_exact(ours, tensor)
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    assert _shapes(read_shapes(reader, tmp_path / "t.gguf")) == _shapes(read_tensors(reader, tmp_path / "t.gguf"))
    if qtype in (QTYPE.Q4_0, QTYPE.Q4_1, QTYPE.Q8_0):  # and as MLX itself reads them, bit for bit
        theirs = {k: v.astype(ours[k].dtype) for k, v in mx.load(str(tmp_path / "t.gguf")).items()}
        assert mx.array_equal(ours["a.scales"], theirs["a.scales"]) and mx.array_equal(
            ours["a.biases"], theirs["a.biases"]
        )
        # the same values; the same codes too, but in a zero block (scale 0), where mx.load keeps the file's
        # codes and we write 0
        assert np.array_equal(_values(ours, "a.weight", qtype), _values(theirs, "a.weight", qtype))


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """A random llama (hidden 256, so llama.cpp's K-quants apply) as an f32 GGUF of our writer."""
    from mlx.utils import tree_flatten

    from mlx_lora.formats.gguf import write_gguf
    from mlx_lora.model.base import load_base

    root = tmp_path_factory.mktemp("k-quants")
    sizes = dict(hidden_size=256, intermediate_size=512, head_dim=64)
    base = load_base(str(make_hf_model(root / "llama", "llama", **sizes)))
    write_gguf(root / "f32.gguf", dict(tree_flatten(base.model.parameters())), base.config, root / "llama", "f32")
    return root / "f32.gguf"


def quantize(src, dst, file_type: str):
    """llama.cpp's own quantizer (what llama-quantize runs)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _cpp_logits(path) -> np.ndarray:
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, type_k=f32, type_v=f32)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)])
    llm.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_llama_cpp_quantized_file_reads_exactly_and_computes_what_llama_cpp_does(f32_gguf, file_type, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from mlx_lora.formats.gguf import write_gguf

    path = quantize(f32_gguf, tmp_path / f"{file_type}.gguf", file_type)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} - {"F32", "Q4_0"} == FILE_TYPES[file_type]
    arrays = read_tensors(reader, path)
    for tensor in reader.tensors:
        _assert_exact(arrays, tensor)
    assert _shapes(read_shapes(reader, path)) == _shapes(arrays)  # what `info` reads from the header alone
    model, config, _ = gguf_model(path)
    ours = mlx_logits(model, TOKENS)
    scale = np.abs(ours).max()
    assert np.abs(_cpp_logits(path) - ours).max() <= ROUNDED_ACTIVATIONS * scale
    plain = {k: v for k, v in config.items() if k != "quantization"}
    weights = dict(tree_flatten(dequantize_model(model).parameters()))
    write_gguf(tmp_path / "same.gguf", weights, plain, f32_gguf.parent / "llama", "f32")
    assert np.abs(_cpp_logits(tmp_path / "same.gguf") - ours).max() <= SAME_WEIGHTS.get(file_type, F32) * scale


def test_unknown_type_and_truncated_file_are_one_line_errors(f32_gguf, tmp_path):
    path = quantize(f32_gguf, tmp_path / "iq4.gguf", "IQ4_NL")
    with pytest.raises(UserError, match="tensors of type IQ4_NL in this GGUF; mlx-lora reads F32, F16, Q4_0"):
        gguf_model(path)
    (tmp_path / "short.gguf").write_bytes(f32_gguf.read_bytes()[:-1000])
    with pytest.raises(UserError, match="not a readable GGUF file .*; is it complete"):
        gguf_model(tmp_path / "short.gguf")
    for bad in (path, tmp_path / "short.gguf"):  # through the command: exit 2, one line, no traceback
        result = CliRunner().invoke(app, ["generate", "--model", str(bad), "--prompt", "Hi"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and str(bad) in result.output
