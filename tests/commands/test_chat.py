import re

import pytest
from conftest import CFG_A, CFG_B, save_random_adapter
from typer.testing import CliRunner

import mlx_lora.commands.chat
from mlx_lora.cli import app

SCRIPT = [
    "/adapter a",
    "hi",
    "/reset",
    "/adapter b",
    "hi",
    "/reset",
    "/base",
    "hi",
    "/reset",
    "/adapter a",
    "hi",
    "and then?",
    "/adapter zz",
    "/nope",
    "/quit",
    "never read",
]


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return save_random_adapter(llama, root / "a", CFG_A, 1), save_random_adapter(llama, root / "b", CFG_B, 2)


def test_chat_switches_adapters_and_keeps_or_resets_the_conversation(llama, adapters, monkeypatch):
    prompt_lengths = []
    stream = mlx_lora.commands.chat.stream

    def recording_stream(base, tokens, cfg):
        prompt_lengths.append(len(tokens))
        return stream(base, tokens, cfg)

    monkeypatch.setattr(mlx_lora.commands.chat, "stream", recording_stream)
    a, b = adapters
    result = CliRunner().invoke(
        app,
        ["chat", "--model", str(llama), "--adapter-path", str(a), "--adapter-path", str(b), "--max-tokens", "6"],
        input="\n".join(SCRIPT) + "\n",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("adapters: a, b, combined; answering with: combined\ncommands: /adapter NAME")
    replies = re.findall(r"^\[(\w+)\] you> (?:\[\w+\] you> )*(.+)$", out, flags=re.M)
    replies = [(who, text) for who, text in replies if not text.startswith(("adapters:", "new conversation", "error:"))]
    assert [who for who, _ in replies] == ["a", "b", "base", "a", "a"]
    (_, a1), (_, b1), (_, base1), (_, a1_again), _ = replies
    assert a1 == a1_again  # /reset starts over and switching back gives the same adapter
    assert len({a1, b1, base1}) > 1
    assert prompt_lengths[:4] == [prompt_lengths[0]] * 4 and prompt_lengths[4] > prompt_lengths[3] + 6
    assert "error: no adapter named 'zz'; loaded: a, b, combined" in out
    assert "error: unknown command /nope" in out
    assert "never read" not in out


def test_chat_needs_a_chat_template(hf_models, tmp_path):
    import json
    import shutil

    model = tmp_path / "plain"
    shutil.copytree(hf_models["llama"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["chat", "--model", str(model)], input="hi\n")
    assert result.exit_code == 2 and "has no chat template" in result.output


def test_image_on_a_text_model_is_one_line_and_the_chat_goes_on(llama, tmp_path):
    result = CliRunner().invoke(
        app, ["chat", "--model", str(llama), "--max-tokens", "3"], input=f"/image {tmp_path}/a.png\nhi\n/quit\n"
    )
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "error: /image: " + str(llama) + " is a text model; give a vision-language --model (docs/vision.md)"
    )
    assert result.output.count("you> ") == 3  # the turn after it was answered
