"""`generate --engine llama.cpp`: llama.cpp decodes a GGUF base (with its adapter as a LoRA GGUF) to
the text MLX decodes, and refuses in one line where it cannot."""

import importlib.util

import llama_cpp
import pytest
from conftest import CFG_A, save_random_adapter
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.formats.gguf import write_gguf
from mlx_lora.inference import cpp_engine
from mlx_lora.model import kernel_choice
from mlx_lora.model.base import load_base

PROMPT = "The quick brown fox"
USING = "decoding with llama.cpp"


def _generate(*args):
    result = CliRunner().invoke(app, ["generate", *[str(a) for a in args]])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def f32_gguf(llama, tmp_path_factory):
    """The llama fixture as a float32 GGUF, and an adapter on it large enough to change the text."""
    out = tmp_path_factory.mktemp("engine")
    base = load_base(str(llama))
    write_gguf(out / "base.gguf", dict(tree_flatten(base.model.parameters())), base.config, base.path, "f32")
    save_random_adapter(out / "base.gguf", out / "adapter", CFG_A, seed=3)  # on the GGUF base: its fingerprint
    return out / "base.gguf", out / "adapter"


def test_llama_cpp_decodes_a_float32_gguf_and_its_adapter_to_mlxs_text(f32_gguf):
    """On a float32 file both engines compute the same logits up to fp32 rounding (the GGUF tests
    bound that), so greedy text agrees; the adapter reaches llama.cpp (the text changes with it)."""
    gguf, adapter = f32_gguf
    texts = {}
    for with_adapter in (False, True):
        extra = ["--adapter-path", adapter] if with_adapter else []
        for engine in ("mlx", "llama.cpp"):
            code, out, err = _generate(
                "--model", gguf, *extra, "--prompt", PROMPT, "--max-tokens", 12, "--engine", engine
            )
            assert code == 0, err
            assert (USING in err) == (engine == "llama.cpp")
            assert ("with the adapter as a LoRA GGUF" in err) == (engine == "llama.cpp" and with_adapter)
            texts[with_adapter, engine] = out
        assert texts[with_adapter, "mlx"] == texts[with_adapter, "llama.cpp"]
    assert texts[False, "mlx"] != texts[True, "mlx"]


@pytest.mark.once
def test_the_real_q4_1_file_decodes_as_llama_cpp_python_itself_decodes_it(smollm2_gguf):
    """Our tokens in, llama.cpp's greedy tokens out, our stops and detokenizer: the same text as
    llama-cpp-python's own greedy loop, which stops at the same end-of-turn token."""
    args = ["--model", smollm2_gguf, "--chat", "--prompt", "What is 3 + 4?", "--max-tokens", 40]
    code, out, err = _generate(*args, "--engine", "llama.cpp")
    assert code == 0 and USING in err, err
    base = load_base(str(smollm2_gguf), lazy=True)
    tokens = base.tokenizer.encode(
        base.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=len(tokens) + 40, verbose=False)
    new = []
    for token in llm.generate(tokens, temp=0.0):
        if token in base.tokenizer.eos_token_ids or len(new) == 40:
            break
        new.append(token)
    llm.close()
    assert out == base.tokenizer.decode(new) + "\n"
    assert "7" in out


@pytest.mark.parametrize(
    "case, refusal",
    [
        ("hf", "the base is not a .gguf file"),
        ("two adapters", "llama.cpp takes one adapter, unweighted"),
        ("off", f"{kernel_choice.ENV}=off keeps every CPU-only path off"),
        ("not installed", "llama-cpp-python is not installed: pip install llama-cpp-python, which compiles"),
    ],
)
def test_llama_cpp_where_it_cannot_decode_is_one_line(case, refusal, llama, f32_gguf, monkeypatch):
    """--engine llama.cpp where it cannot is one line saying why; the default decodes on MLX."""
    gguf, adapter = f32_gguf
    args = ["--model", llama if case == "hf" else gguf, "--prompt", PROMPT, "--max-tokens", 4]
    if case == "two adapters":
        args += ["--adapter-path", adapter, "--adapter-path", adapter]
    if case == "off":
        monkeypatch.setenv(kernel_choice.ENV, "off")
    if case == "not installed":
        find = importlib.util.find_spec
        monkeypatch.setattr(cpp_engine.importlib.util, "find_spec", lambda n: None if n == "llama_cpp" else find(n))
    code, out, err = _generate(*args)
    assert code == 0 and USING not in err and out.strip(), err
    code, out, err = _generate(*args, "--engine", "llama.cpp")
    assert (
        code == 2
        and f"--engine llama.cpp: {refusal}" in err
        and "leave --engine out for MLX" in err
        and len(err.strip().splitlines()) == 1
    ), err


def test_an_unknown_engine_is_one_line():
    code, _, err = _generate("--engine", "vllm")
    assert code == 2 and "--engine must be one of mlx, llama.cpp, got 'vllm'" in err
