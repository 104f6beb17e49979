"""GGUF export, checked in llama.cpp itself (llama-cpp-python): the file loads, and its token ids,
logits and greedy continuation are those of our model and the Hugging Face tokenizer."""

import json
import re
import shutil
from pathlib import Path

import llama_cpp
import mlx.core as mx
import numpy as np
import pytest
from conftest import LLAMA3_ROPE, fp32_tol, hf_logits, make_hf_model, mlx_logits, random_adapter
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.fuse import CHECK_PROMPT
from mlx_lora.config import LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_FILE, check_gguf, write_gguf
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.model.base import DEFAULT_MODEL_DIR, load_base
from mlx_lora.model.gguf import PRE_TOKENIZERS, gguf_config, read_gguf, read_gguf_config
from mlx_lora.model.rope import FACTOR_RTOL, ROPE_FREQS, ROPE_SCALING_KEY

CFG = LoRAConfig(targets="all-linear", num_layers=2, rank=4, alpha=8)
# The shipped tokenizer knows ASCII only (no byte fallback); unicode is tested on SmolLM2's below.
ASCII_PROMPTS = {
    "plain": "Q: What is 3 + 4?\nA: 7",
    "code": "def f(x):\n    return {x: [x * 2]}  # ok\n",
    "numbers": "In 2024, 1234567 people paid $3.14 each.",
}
PROMPTS = ASCII_PROMPTS | {
    "unicode": "Grüße aus Köln: naïve café, 日本語, emoji 😀 and “quotes”.",
    "spaces": "  two  spaces\n\n\ttab and\r\nCRLF   ",
}
# Largest |llama.cpp - MLX| logit, relative to max(1, |logits|), per GGUF weight type. f32: the same
# arithmetic in another order (measured ~1e-6). f16 rounds weights and, in ggml's f16 matmul, the
# activations to 11 bits (2^-11 ~ 5e-4 each, over 4 layers measured ~2e-3); bf16 keeps 8 bits (2^-8,
# measured ~2e-2); q8_0 rounds weights and activations to 8-bit blocks (measured ~4e-2).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
# Gemma 2 in f32: ggml's CPU GELU reads an f16 table, input and output rounded to 11 bits (2^-11 ~ 5e-4
# each), so over 4 layers about 4 * 2^-11 ~ 2e-3. Measured 3.5e-4 (fused) and 3.8e-4 (adapter), against
# ~1e-6 for the other architectures; with MLX's GELU rounded the same way the fused gap falls to 1.0e-4,
# which the test checks (the table is most of it; the rest, 1e-4, we have not traced).
GELU_TABLE_TOLERANCE = 2e-3


def ggml_gelu(gelu):
    """GELU as ggml's CPU backend computes it: looked up in an f16 table, 0 below -10, x above 10."""

    def table(x):
        y = gelu(x.astype(mx.float16).astype(mx.float32)).astype(mx.float16).astype(mx.float32)
        return mx.where(x <= -10, 0.0, mx.where(x >= 10, x, y))

    return table


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _llama(path, **kw):
    # The KV cache in f32 too: llama.cpp's default f16 cache would round K and V.
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=256, verbose=False, type_k=f32, type_v=f32, **kw
    )


def cpp_logits(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])  # (T, V)


def _greedy(logits_of, tokens, n=8) -> list[int]:
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(np.argmax(logits_of(tokens)[-1])))
    return tokens


def _export(model_dir, tmp_path, *flags):
    random_adapter(model_dir, tmp_path / "adapter", CFG)
    result = _run(
        "fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused", "--export-gguf", *flags
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "fused" / GGUF_FILE


def _field(reader, key):
    from gguf import GGUFValueType

    field = reader.fields[key]
    return field.contents(), field.types[-1] if field.types[0] == GGUFValueType.ARRAY else field.types[0]


def _tensor_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def models(hf_models, tmp_path_factory) -> dict:
    """The session's test models plus mistral, qwen3 (head_dim 32 != hidden / heads), gemma2 and llama3
    (Llama 3.2's rope scaling and tied embeddings)."""
    root = tmp_path_factory.mktemp("more-models")
    return hf_models | {arch: make_hf_model(root / arch, arch) for arch in ("mistral", "qwen3", "gemma2", "llama3")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma2", "phi3"])
def test_fused_model_in_llama_cpp_gives_our_tokens_logits_and_greedy_text(models, arch, tmp_path, monkeypatch):
    from gguf import GGUFReader, GGUFValueType

    path = _export(models[arch], tmp_path, "--gguf-type", "f32")
    fused = load_base(str(tmp_path / "fused"))
    llm = _llama(path)
    for name, text in ASCII_PROMPTS.items():
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == fused.tokenizer.encode(text), name
    tokens = fused.tokenizer.encode(ASCII_PROMPTS["plain"])
    ours, theirs = mlx_logits(fused.model, tokens), cpp_logits(llm, tokens)
    tol = GELU_TABLE_TOLERANCE if arch == "gemma2" else TOLERANCE["f32"]
    diff = np.abs(theirs - ours).max()
    assert diff <= tol * max(1.0, np.abs(ours).max()), diff
    assert _greedy(lambda t: cpp_logits(llm, t), tokens) == _greedy(lambda t: mlx_logits(fused.model, t), tokens)
    llm.close()
    if arch == "gemma2":  # most of the gap is ggml's GELU table: with it in MLX too, the gap shrinks
        import mlx_lm.models.gemma2

        monkeypatch.setattr(mlx_lm.models.gemma2.nn, "gelu_approx", ggml_gelu(mlx_lm.models.gemma2.nn.gelu_approx))
        assert np.abs(theirs - mlx_logits(fused.model, tokens)).max() < diff / 2
    reader = GGUFReader(path)
    assert _field(reader, "tokenizer.ggml.token_type")[1] == GGUFValueType.INT32  # llama.cpp requires INT32
    assert (
        _field(reader, "tokenizer.ggml.bos_token_id")[0] == 1 and _field(reader, "tokenizer.ggml.eos_token_id")[0] == 2
    )
    assert _field(reader, "tokenizer.chat_template")[0] == fused.tokenizer.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_each_gguf_type_stays_within_its_rounding_and_keeps_norms_f32(llama, gguf_type, tmp_path):
    path = _export(llama, tmp_path, "--gguf-type", gguf_type)
    fused = load_base(str(tmp_path / "fused"))
    tokens = fused.tokenizer.encode(ASCII_PROMPTS["code"])
    ours = mlx_logits(fused.model, tokens)
    llm = _llama(path)
    diff = np.abs(cpp_logits(llm, tokens) - ours).max()
    llm.close()
    assert diff <= TOLERANCE[gguf_type] * max(1.0, np.abs(ours).max()), diff
    types = _tensor_types(path)
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == gguf_type.upper()


def _checked(output: str) -> tuple[float, float, float, float]:
    """fuse's read-back line: (difference, allowed) against the rounded fused model, then the adapter model."""
    line = next(line for line in output.splitlines() if "read back" in line)
    return tuple(float(x) for x in re.findall(r"(\d\.\d+e[+-]\d+)", line))


@pytest.mark.parametrize(("arch", "gguf_type"), [("llama", "f16"), ("qwen2", "q8_0")])
def test_export_reads_the_gguf_back_and_checks_its_logits(models, arch, gguf_type, tmp_path):
    random_adapter(models[arch], tmp_path / "adapter", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused", "--export-gguf",
                  "--gguf-type", gguf_type)  # fmt: skip
    assert result.exit_code == 0, result.output
    same, same_allowed, cost, cost_allowed = _checked(result.output)
    assert same <= same_allowed and cost <= cost_allowed
    assert same < cost  # the file holds the rounded weights: the rounding, not the layout, is what differs


def test_the_read_back_check_compares_the_same_weights_on_norms_that_f16_rounds(tmp_path):
    """The shipped model's norms were trained (random models' are all 1, which f16 holds exactly):
    the reader holds an f16 file's norms in f16, so the same-weights comparison must round them so
    too, leaving only float32 rounding between the two (before: 2.5e-2 against an allowed 1.8e-2, a
    correct file refused)."""
    random_adapter(DEFAULT_MODEL_DIR, tmp_path / "adapter", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 0, result.output
    same, same_allowed, _, _ = _checked(result.output)
    scale = same_allowed / 1e-3  # max(1, |logits|), as fuse allows 1e-3 of it
    assert same <= fp32_tol(384) * scale, same  # the longest sum: down_proj's 384 (intermediate_size) terms


def test_the_read_back_check_runs_the_file_as_model_gguf_computes_it(tmp_path):
    """The rounding's cost the check reports is what `--model model.gguf` gives: on the CPU an f16
    file computes in float32 (--compute-dtype auto), and so does the check (before: in float16, which
    on the shipped model as the README's first line trains it cost 1.34 against an allowed 0.45, so
    the stranger's `fuse --export-gguf` refused a correct file)."""
    random_adapter(DEFAULT_MODEL_DIR, tmp_path / "adapter", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 0, result.output
    _, _, cost, _ = _checked(result.output)
    as_file = load_for_inference(str(tmp_path / "fused" / GGUF_FILE), None, compute="auto")  # as `generate` loads it
    adapter = load_for_inference(str(DEFAULT_MODEL_DIR), str(tmp_path / "adapter"), compute="auto")
    tokens = mx.array(as_file.tokenizer.encode(CHECK_PROMPT))[None]
    measured = mx.abs(as_file.model(tokens)[0] - adapter.model(tokens)[0]).max().item()
    # printed to 3 digits (0.5%), and our CPU kernels against MLX's own differ by float32 rounding only
    assert abs(cost - measured) <= 0.01 * measured, (cost, measured)


def _transposed_o_proj(tensor):
    """The writer's _tensor, storing attn_output (square here) transposed: a layout llama.cpp would not refuse."""

    def wrong(name, w, qtype, arch):
        data, kind = tensor(name, w, qtype, arch)
        return (data.T.copy(), kind) if name.startswith("blk.1.attn_output") else (data, kind)

    return wrong


@pytest.mark.parametrize("corrupt", ["q/k rows not permuted", "o_proj transposed"])
def test_export_refuses_a_gguf_whose_tensors_are_not_the_model(llama, corrupt, tmp_path, monkeypatch):
    import mlx_lora.formats.gguf as writer

    if corrupt == "q/k rows not permuted":
        monkeypatch.setattr(writer, "permute", lambda w, n_head: w)
    else:
        monkeypatch.setattr(writer, "_tensor", _transposed_o_proj(writer._tensor))
    random_adapter(llama, tmp_path / "adapter", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "adapter", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 2, result.output
    assert re.search(r"model.gguf read back differs from the fused weights rounded to f16 by \S+ \(> \S+\): the "
                     "file's tensors are not the model's; nothing written", result.output)  # fmt: skip
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_weights_rounded_in_mlx_equal_what_gguf_py_reads_from_the_file(llama, gguf_type, tmp_path):
    """as_stored (MLX) against gguf-py's own quantize and de-quantize: the reference the check compares with."""
    import gguf
    from mlx.utils import tree_flatten

    from mlx_lora.formats.gguf import WEIGHT_TYPES, as_stored

    base = load_base(str(llama))
    weights = {k: w for k, w in tree_flatten(base.model.parameters()) if k.endswith(("up_proj.weight", "norm.weight"))}
    qtype = WEIGHT_TYPES[gguf_type][0]
    for key, got in as_stored(weights, base.config, gguf_type).items():
        w = np.array(weights[key], np.float32)
        want = w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert np.array_equal(np.array(got), want), key


@pytest.mark.slow
def test_bf16_base_exports_f16_that_llama_cpp_evaluates(tmp_path):
    base = make_hf_model(tmp_path / "bf16", "llama", dtype="bfloat16")
    path = _export(base, tmp_path)  # default --gguf-type f16
    fused = load_base(str(tmp_path / "fused"))
    tokens = fused.tokenizer.encode(ASCII_PROMPTS["plain"])
    ours = mlx_logits(fused.model, tokens)  # MLX computes in bf16 here: its rounding, not only ours
    llm = _llama(path)
    theirs = cpp_logits(llm, tokens)
    llm.close()
    assert np.isfinite(theirs).all()
    assert np.abs(theirs - ours).max() <= TOLERANCE["bf16"] * max(1.0, np.abs(ours).max())
    types = _tensor_types(path)
    assert types["blk.0.ffn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "F16"


@pytest.mark.slow
def test_qlora_base_is_dequantized_before_export(llama, tmp_path):
    from mlx_lm import convert

    convert(str(llama), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    path = _export(tmp_path / "q4", tmp_path, "--gguf-type", "f32")
    fused = load_base(str(tmp_path / "fused"))
    assert "quantization" not in fused.config
    tokens = fused.tokenizer.encode(ASCII_PROMPTS["numbers"])
    ours = mlx_logits(fused.model, tokens)
    llm = _llama(path)
    diff = np.abs(cpp_logits(llm, tokens) - ours).max()
    llm.close()
    assert diff <= TOLERANCE["f32"] * max(1.0, np.abs(ours).max()), diff
    assert set(_tensor_types(path).values()) == {"F32"}


def _with_pre_tokenizer(src, dst, pre):
    shutil.copytree(src, dst)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = pre
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.fixture(scope="module")
def smollm2_shaped(smollm2_tokenizer, tmp_path_factory):
    """A random llama with SmolLM2's tokenizer, loaded."""
    return load_base(
        str(make_hf_model(tmp_path_factory.mktemp("smol") / "llama", "llama", tokenizer=smollm2_tokenizer))
    )


@pytest.mark.once
@pytest.mark.slow
@pytest.mark.parametrize("pre", PRE_TOKENIZERS)  # SmolLM2's vocabulary and merges under each split
def test_byte_level_bpe_gives_the_hugging_face_ids_in_llama_cpp(smollm2_shaped, pre, tmp_path):
    from gguf import GGUFReader
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer

    tok_dir = _with_pre_tokenizer(smollm2_shaped.path, tmp_path / "tok", PRE_TOKENIZERS[pre])
    path = tmp_path / GGUF_FILE
    write_gguf(path, dict(tree_flatten(smollm2_shaped.model.parameters())), smollm2_shaped.config, tok_dir, "f16")
    assert _field(GGUFReader(path), "tokenizer.ggml.pre")[0] == pre
    assert _field(GGUFReader(path), "tokenizer.ggml.model")[0] == "gpt2"
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for name, text in PROMPTS.items():
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == hf.encode(text).ids, name
    llm.close()
    template = (smollm2_shaped.path / "chat_template.jinja").read_text()
    assert _field(GGUFReader(path), "tokenizer.chat_template")[0] == template


@pytest.fixture(scope="module")
def sentencepiece_shaped(tmp_path_factory):
    """A random llama with a SentencePiece BPE tokenizer (byte fallback) trained here on README.md,
    as tokenizer.model and as the tokenizer.json transformers makes of it."""
    import sentencepiece
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("spm")
    (root / "corpus.txt").write_text((Path(__file__).parents[2] / "README.md").read_text() + PROMPTS["unicode"])
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,  # as Llama 2
    )  # fmt: skip
    (root / "src").mkdir()
    shutil.copy(root / "sp.model", root / "src" / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (root / "src" / "tokenizer_config.json").write_text(json.dumps(special))
    AutoTokenizer.from_pretrained(root / "src").save_pretrained(root / "tok")
    shutil.copy(root / "sp.model", root / "tok" / "tokenizer.model")
    return load_base(str(make_hf_model(root / "llama", "llama", tokenizer=root / "tok")))


@pytest.mark.slow
@pytest.mark.parametrize("scores", ["tokenizer.model", "merge order"])
def test_sentencepiece_gives_the_same_ids_in_llama_cpp(sentencepiece_shaped, scores, tmp_path):
    import sentencepiece
    from gguf import GGUFReader
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer

    tok_dir = shutil.copytree(sentencepiece_shaped.path, tmp_path / "tok")
    if scores == "merge order":
        (tok_dir / "tokenizer.model").unlink()
    path = tmp_path / GGUF_FILE
    weights = dict(tree_flatten(sentencepiece_shaped.model.parameters()))
    write_gguf(path, weights, sentencepiece_shaped.config, tok_dir, "f16")
    assert _field(GGUFReader(path), "tokenizer.ggml.model")[0] == "llama"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_shaped.path / "tokenizer.model"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for name, text in PROMPTS.items():
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1] + sp.encode(text), name
        if name != "spaces":  # transformers' copy of the tokenizer splits leading double spaces otherwise
            assert hf.encode(text).ids == [1] + sp.encode(text), name
    llm.close()


@pytest.mark.once
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "smollm3"])
def test_our_gguf_reads_back_as_the_same_model(smollm2_tokenizer, arch, tmp_path):
    from mlx.utils import tree_flatten

    ours = load_base(str(make_hf_model(tmp_path / arch, arch, tokenizer=smollm2_tokenizer)))
    ours.tokenizer.save_pretrained(str(tmp_path / "tok"))  # as fuse does: transformers' Qwen2Tokenizer
    path = tmp_path / GGUF_FILE  # splits the Qwen way whatever tokenizer.json said, and saves that
    write_gguf(path, dict(tree_flatten(ours.model.parameters())), ours.config, tmp_path / "tok", "f32")
    back = load_base(str(path))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for name, text in PROMPTS.items():
        tokens = ours.tokenizer.encode(text)
        assert back.tokenizer.encode(text) == tokens == llm.tokenize(text.encode(), add_bos=True, special=False), name
        expected = mlx_logits(ours.model, tokens)
        assert np.abs(mlx_logits(back.model, tokens) - expected).max() <= 1e-5 * np.abs(expected).max(), name
    llm.close()


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory) -> Path:
    """A SentencePiece BPE shaped as Gemma's (its special pieces and ids, no dummy prefix, byte
    fallback, digits split), trained here on README.md, as transformers' GemmaTokenizer saves it."""
    import sentencepiece
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gemma-spm")
    (root / "corpus.txt").write_text((Path(__file__).parents[2] / "README.md").read_text() + PROMPTS["unicode"])
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<start_of_turn>"],
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2,
    )  # fmt: skip
    (root / "src").mkdir()
    shutil.copy(root / "sp.model", root / "src" / "tokenizer.model")
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = special | {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True}
    (root / "src" / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(root / "src").save_pretrained(root / "tok")
    shutil.copy(root / "sp.model", root / "tok" / "tokenizer.model")
    return root / "tok"


@pytest.mark.slow
def test_gemma3_gguf_reads_back_with_gemmas_tokenizer_and_logits(gemma_tokenizer, tmp_path):
    """The writer's Gemma 3 (norms + 1, q/k norms, sliding window, tied head, a SentencePiece
    vocabulary) read back: the ids of the Hugging Face tokenizer (and llama.cpp's), the same logits."""
    import sentencepiece
    from mlx.utils import tree_flatten

    pattern = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])  # llama.cpp's
    ours = load_base(str(make_hf_model(tmp_path / "gemma3", "gemma3", tokenizer=gemma_tokenizer, **pattern)))
    path = tmp_path / GGUF_FILE
    write_gguf(path, dict(tree_flatten(ours.model.parameters())), ours.config, gemma_tokenizer, "f32")
    back = load_base(str(path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(gemma_tokenizer / "tokenizer.model"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for name, text in PROMPTS.items():
        tokens = ours.tokenizer.encode(text)
        assert tokens == [2] + sp.encode(text), name
        assert back.tokenizer.encode(text) == tokens == llm.tokenize(text.encode(), add_bos=True, special=False), name
        assert back.tokenizer.decode(tokens[1:]) == text, name
        expected = mlx_logits(ours.model, tokens)
        assert np.abs(mlx_logits(back.model, tokens) - expected).max() <= 1e-5 * np.abs(expected).max(), name
    llm.close()
    assert {k: back.config[k] for k in ("sliding_window", "sliding_window_pattern", "query_pre_attn_scalar")} == {
        k: ours.config[k] for k in ("sliding_window", "sliding_window_pattern", "query_pre_attn_scalar")
    }


def test_unknown_pre_tokenizer_is_refused_in_one_line(smollm2_shaped, tmp_path):
    from mlx.utils import tree_flatten

    tok_dir = _with_pre_tokenizer(smollm2_shaped.path, tmp_path / "tok", {"type": "Whitespace"})
    with pytest.raises(UserError, match="knows the pre-tokenizers gpt-2, smollm, llama-bpe, qwen2 .* not this one"):
        write_gguf(
            tmp_path / GGUF_FILE, dict(tree_flatten(smollm2_shaped.model.parameters())), smollm2_shaped.config, tok_dir
        )


def test_unsupported_architecture_or_type_is_refused_before_anything_is_written(hf_models, tmp_path):
    # Gemma (1): mlx-lm's computes GELU exactly, Hugging Face's and llama.cpp's with tanh
    random_adapter(hf_models["gemma"], tmp_path / "ours", CFG)
    result = _run("fuse", "--adapter-path", tmp_path / "ours", "--save-path", tmp_path / "fused", "--export-gguf")
    assert result.exit_code == 2
    supported = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3, olmo2, smollm3"
    assert f"GGUF export supports {supported} models, not gemma" in result.output
    result = _run("fuse", "--adapter-path", tmp_path / "ours", "--save-path", tmp_path / "fused", "--gguf-type", "q4")
    assert result.exit_code == 2 and "--gguf-type must be one of f32, f16, bf16, q8_0, got 'q4'" in result.output
    assert not (tmp_path / "fused").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "llama3"])
def test_adapter_gguf_on_the_base_gguf_gives_our_adapter_logits_in_llama_cpp(models, arch, tmp_path):
    from mlx.utils import tree_flatten

    base = load_base(str(models[arch]))
    write_gguf(tmp_path / "base.gguf", dict(tree_flatten(base.model.parameters())), base.config, base.path, "f32")
    # rsLoRA and a per-module rank: scales llama.cpp's one alpha cannot express, folded into B
    cfg = LoRAConfig(targets="all-linear", num_layers=2, rank=4, alpha=8, rslora=True, rank_pattern="o_proj=2")
    ours = random_adapter(models[arch], tmp_path / "adapter", cfg)
    result = _run("convert", "--to", "gguf", tmp_path / "adapter", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tokens = ours.tokenizer.encode(ASCII_PROMPTS["plain"])
    expected, plain = mlx_logits(ours.model, tokens), mlx_logits(base.model, tokens)
    llm = _llama(tmp_path / "base.gguf", lora_path=str(tmp_path / "out" / "adapter.gguf"))
    diff = np.abs(cpp_logits(llm, tokens) - expected).max()
    llm.close()
    assert np.abs(expected - plain).max() > 0.5  # the adapter changes the logits visibly
    tol = GELU_TABLE_TOLERANCE if arch == "gemma2" else TOLERANCE["f32"]
    assert diff <= tol * max(1.0, np.abs(expected).max()), diff


def test_gemma2_query_scale_llama_cpp_cannot_express_is_refused():
    config = {"model_type": "gemma2", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    check_gguf(config | {"head_dim": 16, "query_pre_attn_scalar": 16}, "f16")
    check_gguf(config | {"num_hidden_layers": 46, "head_dim": 8, "query_pre_attn_scalar": 16}, "f16")  # as 27B
    with pytest.raises(
        UserError, match=r"llama.cpp scales Gemma 2's queries by 1/sqrt\(16\), this model by 1/sqrt\(32\)"
    ):
        check_gguf(config | {"head_dim": 16, "query_pre_attn_scalar": 32}, "f16")


@pytest.mark.parametrize(
    ("model_type", "change", "refusal"),
    [
        (
            "smollm3",
            {"no_rope_layers": [1, 1, 0, 1]},
            "smollm3 leaves rope out of every 4th block, this model elsewhere",
        ),
        (
            "qwen3_moe",
            {"norm_topk_prob": False},
            "qwen3moe renormalizes the chosen experts' weights, this model does not",
        ),
        (
            "qwen3_moe",
            {"mlp_only_layers": [0]},
            r"qwen3moe has experts in every block, this model not \(mlp_only_layers",
        ),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "qwen3moe has experts in every block, this model not"),
        ("gemma3_text", {"sliding_window_pattern": 4}, "gemma3 has a global block every 6th, this model not"),
        ("gemma3_text", {"rope_local_base_freq": 2e4}, "gemma3 rotates its sliding blocks at base 10000, this model"),
    ],
)
def test_what_llama_cpp_fixes_otherwise_is_refused(model_type, change, refusal):
    """llama.cpp's smollm3, qwen3moe and gemma3 graphs fix what these configs can set: a model that sets it
    otherwise would compute something else in llama.cpp."""
    config = {"model_type": model_type, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    as_llama_cpp = {
        "smollm3": {"no_rope_layers": [1, 1, 1, 0]},
        "qwen3_moe": {"norm_topk_prob": True},
        "gemma3_text": {"sliding_window_pattern": 6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 16},
    }[model_type]
    check_gguf(config | as_llama_cpp, "f16")
    for flag in ("--export-gguf", "--to gguf"):
        with pytest.raises(UserError, match=f"^{flag}: llama.cpp's {refusal}.*; llama.cpp cannot run it as trained$"):
            check_gguf(config | as_llama_cpp | change, "f16", flag)


def test_dora_adapter_has_no_gguf_form(llama, tmp_path):
    random_adapter(llama, tmp_path / "adapter", LoRAConfig(targets="q_proj", num_layers=1, rank=2, dora=True))
    result = _run("convert", "--to", "gguf", tmp_path / "adapter", tmp_path / "out")
    assert result.exit_code == 2 and "llama.cpp's LoRA adapters have no DoRA magnitude" in result.output
    assert not (tmp_path / "out").exists()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_llama3_rope_scaling_runs_in_llama_cpp_as_in_transformers(models, tmp_path):
    """Llama 3.2's rope scaling, tied embeddings: the file's rope_freqs are what transformers divides
    each frequency by, and llama.cpp's logits are transformers' and ours; without the scaling they
    would be far off, so wrong factors could not pass."""
    from gguf import GGUFReader
    from mlx_lm.utils import load_model

    path = _export(models["llama3"], tmp_path, "--gguf-type", "f32")  # fuse reads it back: its own check
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the output too
    hf = _hf(tmp_path / "fused")
    default = 1 / hf.config.rope_parameters["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(
        tensors[ROPE_FREQS].data, default / hf.model.rotary_emb.inv_freq.numpy(), rtol=FACTOR_RTOL
    )
    fused = load_base(str(tmp_path / "fused"))
    tokens = fused.tokenizer.encode(ASCII_PROMPTS["code"])
    expected = hf_logits(hf, tokens)
    llm = _llama(path)
    theirs = cpp_logits(llm, tokens)
    llm.close()
    tol = TOLERANCE["f32"] * max(1.0, np.abs(expected).max())
    assert np.abs(theirs - expected).max() <= tol and np.abs(mlx_logits(fused.model, tokens) - expected).max() <= tol
    unscaled, _ = load_model(tmp_path / "fused", model_config={"rope_scaling": None})
    assert np.abs(mlx_logits(unscaled, tokens) - expected).max() > 100 * tol


@pytest.mark.parametrize("written_by", ["us", "another converter"])
def test_llama3_gguf_is_a_base_with_its_rope_scaling(models, written_by, tmp_path, monkeypatch):
    """`--model model.gguf` on a Llama 3.2-shaped file: the rope_scaling from our key, or from
    rope_freqs alone (a file of convert_hf_to_gguf.py has no key of ours), and transformers' logits."""
    from mlx.utils import tree_flatten

    import mlx_lora.formats.gguf as writer

    if written_by == "another converter":
        monkeypatch.setattr(writer, "ROPE_SCALING_KEY", "general.not_read")
    ours = load_base(str(models["llama3"]))
    path = tmp_path / GGUF_FILE
    write_gguf(path, dict(tree_flatten(ours.model.parameters())), ours.config, ours.path, "f32")
    back = load_base(str(path))
    assert back.config["rope_scaling"] == LLAMA3_ROPE
    tokens = ours.tokenizer.encode(ASCII_PROMPTS["code"])
    expected = hf_logits(_hf(models["llama3"]), tokens)
    assert np.abs(mlx_logits(back.model, tokens) - expected).max() <= TOLERANCE["f32"] * max(1, np.abs(expected).max())


def test_rope_freqs_that_are_not_llama3_or_not_its_key_are_refused(models, tmp_path):
    from mlx.utils import tree_flatten

    ours = load_base(str(models["llama3"]))
    path = tmp_path / GGUF_FILE
    write_gguf(path, dict(tree_flatten(ours.model.parameters())), ours.config, ours.path, "f32")
    tensors, meta = read_gguf(path, lazy=True)
    assert gguf_config(meta, tensors, path)["rope_scaling"] == LLAMA3_ROPE  # lazy: rope_freqs read all the same
    assert read_gguf_config(path)["rope_scaling"] == LLAMA3_ROPE  # as `convert --model model.gguf` reads it
    altered = meta | {ROPE_SCALING_KEY: json.dumps(LLAMA3_ROPE | {"factor": 8.0})}
    with pytest.raises(UserError, match=f"rope_freqs.weight disagrees with {ROPE_SCALING_KEY}; the file was altered"):
        gguf_config(altered, tensors, path)
    foreign = {k: v for k, v in meta.items() if k != ROPE_SCALING_KEY}
    steps = tensors | {ROPE_FREQS: mx.array([1, 1, 1, 1, 32, 32, 32, 32], mx.float32)}
    with pytest.raises(UserError, match="rope_freqs.weight is not Llama 3's rope scaling with two or more"):
        gguf_config(foreign, steps, path)


@pytest.mark.parametrize(
    ("model_type", "rope", "refusal"),
    [
        ("llama", {"rope_type": "yarn", "factor": 4.0}, "rope scaling 'yarn' of a llama model is not written yet"),
        ("qwen2", LLAMA3_ROPE, "rope scaling 'llama3' of a qwen2 model is not written yet"),
    ],
)
def test_rope_scaling_llama_cpp_is_not_given_is_refused(model_type, rope, refusal):
    config = {"model_type": model_type, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    check_gguf(config | {"rope_scaling": LLAMA3_ROPE, "model_type": "llama"}, "f16")
    with pytest.raises(UserError, match=refusal):
        check_gguf(config | {"rope_scaling": rope}, "f16")
