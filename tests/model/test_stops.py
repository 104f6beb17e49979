"""Every stop token a model declares ends generate, eval and serve; the fused model and its GGUF carry them."""

import json

import llama_cpp
import mlx.core as mx
import pytest
from conftest import make_hf_model, random_adapter
from mlx_lm.generate import BatchGenerator
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import GenerateConfig, LoRAConfig
from mlx_lora.formats.gguf import GGUF_FILE
from mlx_lora.inference.generation import generate
from mlx_lora.model.base import load_base

EOT = "<|im_end|>"  # SmolLM2's ChatML template closes a reply with it
ORDINARY = 300  # a plain token, which llama.cpp cannot take for an end token by its text


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer, tmp_path_factory):
    """A llama with SmolLM2's tokenizer whose EOS is <|endoftext|> (0), not the template's <|im_end|>,
    and whose generation_config.json lists one more stop token."""
    path = make_hf_model(tmp_path_factory.mktemp("chatml") / "m", "llama", tokenizer=smollm2_tokenizer)
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        data = json.loads((path / name).read_text())
        data[key] = "<|endoftext|>" if key == "eos_token" else 0
        (path / name).write_text(json.dumps(data))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, ORDINARY], "do_sample": False}))
    return path


def test_eos_generation_config_and_template_end_of_turn_all_stop(chatml):
    tokenizer = load_base(str(chatml)).tokenizer
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert tokenizer.eos_token_id == 0 and eot == 2
    assert tokenizer.eos_token_ids == {0, eot, ORDINARY}


def test_generate_and_batch_generation_stop_at_the_templates_end_of_turn(chatml):
    """The model made to answer <|im_end|> first (its output row a copy of the greedy token's,
    doubled): generation ends there at once instead of running to max_tokens. <|im_end|> is
    declared only by the chat template."""
    base = load_base(str(chatml))
    prompt = base.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    first = int(mx.argmax(base.model(mx.array([prompt]))[0, -1]).item())
    weight = base.model.lm_head.weight
    base.model.lm_head.weight = weight.at[2].add(2 * weight[first] - weight[2])
    assert int(mx.argmax(base.model(mx.array([prompt]))[0, -1]).item()) == 2
    responses = list(generate(base, GenerateConfig(model=str(chatml), prompt="hi", chat=True, max_tokens=8)))
    assert responses[-1].finish_reason == "stop" and responses[-1].generation_tokens == 1
    # eval and serve: mlx-lm's BatchGenerator on the same stop set
    generator = BatchGenerator(base.model, max_tokens=8, stop_tokens=[[t] for t in base.tokenizer.eos_token_ids])
    generator.insert([prompt])
    finish = [r.finish_reason for r in generator.next_generated()]
    generator.close()
    assert finish == ["stop"]


@pytest.mark.once
@pytest.mark.slow
def test_fused_model_and_its_gguf_carry_every_stop(chatml, tmp_path):
    random_adapter(chatml, tmp_path / "adapter", LoRAConfig(targets="q_proj", num_layers=1, rank=2, alpha=4))
    out = tmp_path / "fused"
    args = ["fuse", "--adapter-path", tmp_path / "adapter", "--save-path", out, "--export-gguf", "--gguf-type", "f32"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [0, 2, ORDINARY], "do_sample": False}
    assert load_base(str(out)).tokenizer.eos_token_ids == {0, 2, ORDINARY}
    assert load_base(str(out / GGUF_FILE)).tokenizer.eos_token_ids == {0, 2, ORDINARY}
    llm = llama_cpp.Llama(model_path=str(out / GGUF_FILE), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    llm.close()
    assert {0, 2, ORDINARY} <= set(eog)
