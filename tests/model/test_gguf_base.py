"""A llama.cpp GGUF file as the base: our tokens, logits and greedy text on the real SmolLM2 Q4_1
file are llama.cpp's own on the same file, and an adapter trained on it fuses back into a GGUF."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import CFG_A, mlx_logits, trained_adapter
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import permute
from mlx_lora.model.base import load_base
from mlx_lora.model.gguf import gguf_config, read_gguf, read_gguf_shapes, unpermute

llama_cpp = pytest.importorskip("llama_cpp")
PROMPTS = {
    "plain": "The capital of France is",
    "numbers": "In 2024, 1234567 people paid $3.14 each.",
    "code": "def f(x):\n    return {x: [x * 2]}  # ok\n",
    "unicode": "Grüße aus Köln: naïve café, 日本語, emoji 😀",
}
# Largest |llama.cpp - ours| logit, relative to the largest |logit|. On the Q4_1 file: both read the
# same 4-bit weights exactly, but llama.cpp rounds the activations to 8-bit blocks (Q8_1) for every
# Q4_1 dot product; measured 2.3e-2..3.5e-2 over the prompts. On an f32 GGUF: the same float32
# arithmetic in another order; measured 2e-6..4e-6 (so the Q4_1 gap is llama.cpp's rounding, not ours).
Q4_TOLERANCE = 6e-2
F32_TOLERANCE = 1e-4


def _llama(path):
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, type_k=f32, type_v=f32)


def _cpp_logits(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_base(str(smollm2_gguf))


def test_lazy_gguf_base_has_the_shapes_and_dtypes_of_the_loaded_one(smollm2, smollm2_gguf, monkeypatch):
    """`info` reads a GGUF's header alone: the stand-ins have every tensor's mx.load shape and dtype
    (this file has F32, Q4_1 and Q8_0 tensors), so the model built on them is the loaded one's shape."""
    stand_ins, meta = read_gguf_shapes(Path(smollm2_gguf))
    loaded, loaded_meta = read_gguf(Path(smollm2_gguf))
    assert {k: (v.shape, v.dtype) for k, v in stand_ins.items()} == {k: (v.shape, v.dtype) for k, v in loaded.items()}
    assert gguf_config(meta, stand_ins, smollm2_gguf) == gguf_config(loaded_meta, loaded, smollm2_gguf)
    monkeypatch.setattr(mx, "load", None)  # a lazy load that read the tensors would fail here
    lazy = load_base(str(smollm2_gguf), lazy=True)
    shapes = lambda model: {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    assert shapes(lazy.model) == shapes(smollm2.model) and lazy.config == smollm2.config


def test_unpermute_undoes_llama_cpp_row_order():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)  # 8 heads of 6 rows
    import mlx.core as mx

    assert np.array_equal(np.array(unpermute(mx.array(permute(w, 8)), 8)), w)


@pytest.mark.slow
def test_smollm2_gguf_gives_llama_cpp_tokens_logits_and_greedy_text(smollm2, smollm2_gguf):
    assert smollm2.config["model_type"] == "llama" and smollm2.config["quantization"]["bits"] == 4
    llm = _llama(smollm2_gguf)
    for name, text in PROMPTS.items():
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert smollm2.tokenizer.encode(text) == tokens, name
        ours = mlx_logits(smollm2.model, tokens)
        diff = np.abs(_cpp_logits(llm, tokens) - ours).max()
        assert diff <= Q4_TOLERANCE * np.abs(ours).max(), (name, diff)
    prompt = llm.tokenize(PROMPTS["plain"].encode(), add_bos=True, special=False)
    theirs = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    tokens = list(prompt)
    for _ in range(8):
        tokens.append(int(np.argmax(mlx_logits(smollm2.model, tokens)[-1])))
    assert smollm2.tokenizer.decode(tokens[len(prompt) :]) == theirs


@pytest.mark.slow
def test_adapter_on_a_gguf_base_fuses_into_a_gguf_llama_cpp_runs(smollm2_gguf, tmp_path):
    adapted = trained_adapter(smollm2_gguf, tmp_path / "adapter", CFG_A, size=0.05)
    adapted.model.eval()
    result = CliRunner().invoke(
        app, ["fuse", "--adapter-path", str(tmp_path / "adapter"), "--save-path", str(tmp_path / "fused"),
              "--export-gguf", "--gguf-type", "f32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tokens = adapted.tokenizer.encode(PROMPTS["plain"])
    ours = mlx_logits(adapted.model, tokens)
    llm = _llama(tmp_path / "fused" / "model.gguf")
    theirs = _cpp_logits(llm, tokens)
    llm.close()
    assert np.abs(theirs - ours).max() <= F32_TOLERANCE * np.abs(ours).max()


@pytest.mark.slow
def test_gguf_base_as_we_read_it_is_what_llama_cpp_computes_once_de_quantized(smollm2_gguf, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from mlx_lora.formats.gguf import write_gguf

    smollm2 = load_base(str(smollm2_gguf))  # our own copy: de-quantized below
    tokens = {name: smollm2.tokenizer.encode(text) for name, text in PROMPTS.items()}
    ours = {name: mlx_logits(smollm2.model, t) for name, t in tokens.items()}  # on the Q4_1 weights
    smollm2.tokenizer.save_pretrained(str(tmp_path))
    plain = dequantize_model(smollm2.model)
    config = {k: v for k, v in smollm2.config.items() if k != "quantization"}
    write_gguf(tmp_path / "f32.gguf", dict(tree_flatten(plain.parameters())), config, tmp_path, "f32")
    llm = _llama(tmp_path / "f32.gguf")
    for name, t in tokens.items():
        assert llm.tokenize(PROMPTS[name].encode(), add_bos=True, special=False) == t, name
        diff = np.abs(_cpp_logits(llm, t) - ours[name]).max()
        assert diff <= F32_TOLERANCE * np.abs(ours[name]).max(), (name, diff)
    llm.close()


def test_missing_or_foreign_gguf_is_a_user_error(tmp_path):
    import gguf

    with pytest.raises(UserError, match="no such GGUF file"):
        load_base(str(tmp_path / "nothing.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="a GGUF of gpt2; reading GGUF supports llama, qwen2, qwen3 only"):
        load_base(str(tmp_path / "gpt2.gguf"))
