"""The `mlx-lora` command end to end: train -> generate -> fuse -> reload in mlx-lm and transformers."""

import json
import os
import re

import mlx.core as mx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base

# Phi-3 keeps q, k and v in one fused qkv_proj, as transformers does.
TARGETS = {"llama": "q_proj,v_proj", "qwen2": "q_proj,v_proj", "phi3": "qkv_proj,o_proj", "gemma": "q_proj,v_proj"}
PROMPT = "Q: What is 2 + 3?\nA:"


def run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def train_args(model, data, out, *extra):
    return [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        out,
        "--rank",
        4,
        "--alpha",
        8,
        "--num-layers",
        2,
        "--iters",
        6,
        "--batch-size",
        4,
        "--learning-rate",
        2e-3,
        "--val-every",
        3,
        "--save-every",
        3,
        "--report-every",
        2,
        "--seed",
        1,
        *extra,
    ]


def adapter_logits(model_dir, adapter_dir, tokens):
    base = load_base(str(model_dir))
    load_adapter(base, adapter_dir)
    return base.model(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_train_generate_fuse_and_reload_everywhere(hf_models, tiny_data, tmp_path, arch):
    import torch
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate as mlx_lm_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = hf_models[arch], tmp_path / "adapters"
    log = run(*train_args(model_dir, tiny_data, out, "--targets", TARGETS[arch]))
    assert "val loss" in log and "tok/s" in log and "peak mem" in log

    weights = mx.load(str(out / ADAPTER_WEIGHTS))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["layer_indices"] == [2, 3] and config["rank"] == 4 and config["scale"] == 2.0
    assert set(weights) == {f"{m}.{k}" for m in config["modules"] for k in ("lora_a", "lora_b")}
    assert any(mx.abs(w).max().item() > 0 for k, w in weights.items() if k.endswith("lora_b"))  # it trained
    assert (out / "checkpoints" / "step-0000003" / ADAPTER_WEIGHTS).is_file()

    # generate finds the base through adapter_config.json and matches mlx-lm's greedy text
    text = run("generate", "--adapter-path", out, "--prompt", PROMPT, "--max-tokens", 8)
    base = load_base(str(model_dir))
    load_adapter(base, out)
    expected = mlx_lm_generate(base.model, base.tokenizer, PROMPT, max_tokens=8)
    assert text.removesuffix("\n") == expected and expected

    tokens = mx.array([base.tokenizer.encode(PROMPT)])
    want = adapter_logits(model_dir, out, tokens)
    fused_dir = tmp_path / "fused"
    log = run("fuse", "--adapter-path", out, "--save-path", fused_dir)
    assert "largest logit difference" in log

    fused, tokenizer = mlx_lm_load(str(fused_dir))
    assert tokenizer.encode(PROMPT) == base.tokenizer.encode(PROMPT)
    assert mx.allclose(fused(tokens), want, atol=1e-4).item()

    hf = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(fused_dir)(PROMPT)["input_ids"] == base.tokenizer.encode(PROMPT)
    with torch.no_grad():
        got = hf(torch.tensor(np.array(tokens))).logits.numpy()
    np.testing.assert_allclose(got, np.array(want), atol=1e-4)


def test_config_file_flags_override_and_options_reach_the_adapter(llama, tiny_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: 2\nalpha: 4\ndropout: 0.1\nlayers: [0, 2]\ntargets: k_proj\nlearning-rate: 1e-3\n")
    out = tmp_path / "a"
    for split in ("train", "valid"):  # one row within --max-seq-length (all rows too long is an error)
        with (tiny_data / f"{split}.jsonl").open("a") as f:
            f.write(json.dumps({"prompt": "Q:", "completion": " 1"}) + "\n")
    log = run(
        "train",
        "--config",
        config,
        "--model",
        llama,
        "--data",
        tiny_data,
        "--adapter-path",
        out,
        "--rank",
        8,
        "--epochs",
        0.5,
        "--batch-size",
        4,
        "--max-seq-length",
        24,
        "--val-every",
        0,
        "--save-every",
        0,
        "--train-on-prompt",
    )
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert saved["rank"] == 8 and saved["alpha"] == 4 and saved["dropout"] == 0.1  # flag beats file
    assert saved["modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.2.self_attn.k_proj"]
    assert "step 2/2" in log  # 17 rows / batch 4 = 5 batches an epoch; half an epoch rounds to 2 steps
    assert "truncated" in log  # --max-seq-length 24 cuts the longer rows
    assert not (out / "checkpoints").exists()


def test_same_seed_same_adapter_and_generation_options(llama, tiny_data, tmp_path):
    for name in ("a", "b"):
        run(*train_args(llama, tiny_data, tmp_path / name, "--dropout", 0.2))
    a, b = (mx.load(str(tmp_path / n / ADAPTER_WEIGHTS)) for n in ("a", "b"))
    assert all(mx.array_equal(a[k], b[k]) for k in a)

    sample = (
        "generate",
        "--adapter-path",
        tmp_path / "a",
        "--prompt",
        PROMPT,
        "--max-tokens",
        12,
        "--temp",
        1.5,
        "--top-p",
        0.9,
    )
    assert run(*sample, "--seed", 3) == run(*sample, "--seed", 3)
    outputs = {run(*sample, "--seed", s) for s in range(4)}
    assert len(outputs) > 1  # temperature sampling really samples
    chat = run("generate", "--model", llama, "--prompt", "hi", "--max-tokens", 4, "--chat")
    assert chat.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--targets", "nope"], "'nope' matches no linear module"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--layers", "0,9"], "the model has blocks 0..3"),
    ],
)
def test_bad_options_are_one_line_errors(llama, tiny_data, tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["train", "--model", str(llama), "--data", str(tiny_data), "--adapter-path", str(tmp_path / "a"), *args]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a" / ADAPTER_WEIGHTS).exists()


@pytest.mark.slow
def test_quantized_base_trains_and_fuses(llama, tiny_data, tmp_path):
    from mlx_lm import convert
    from mlx_lm import load as mlx_lm_load

    quantized = tmp_path / "q4"
    convert(str(llama), str(quantized), quantize=True, q_bits=4, q_group_size=32)
    out = tmp_path / "adapters"
    run(*train_args(quantized, tiny_data, out))
    tokens = mx.array([[1, 40, 41, 42, 43]])
    want = adapter_logits(quantized, out, tokens)

    log = run("fuse", "--adapter-path", out, "--save-path", tmp_path / "requantized", "--requantize")
    assert "re-quantizing to 4-bit changed the logits by up to" in log
    assert "quantization" in json.loads((tmp_path / "requantized" / "config.json").read_text())

    for name, flags in (("full", []), ("dequantized", ["--dequantize"])):  # the default, and said explicitly
        run("fuse", "--adapter-path", out, "--save-path", tmp_path / name, *flags)
        assert "quantization" not in json.loads((tmp_path / name / "config.json").read_text())
    full, _ = mlx_lm_load(str(tmp_path / "full"))
    assert mx.allclose(full(tokens), want, atol=1e-4).item()


def test_saved_files_get_ordinary_permissions(llama, tiny_data, tmp_path):
    out = tmp_path / "a"
    run(*train_args(llama, tiny_data, out, "--iters", 1))
    run("fuse", "--adapter-path", out, "--save-path", tmp_path / "fused")
    mask = os.umask(0)
    os.umask(mask)
    assert (out / ADAPTER_WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "fused").stat().st_mode & 0o777 == 0o777 & ~mask


COMMANDS = {c.name: c.callback for c in app.registered_commands}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_fits_80_columns_with_every_flag_whole(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "<bool>" not in result.output and "…" not in result.output
    options = [p.default for p in COMMANDS[command].__signature__.parameters.values()]
    flags = [o.param_decls[0] for o in options if isinstance(o, typer.models.OptionInfo) and not o.hidden]
    assert flags and all(any(f"│ {flag} " in line for line in lines) for flag in flags), result.output
    if command == "train":
        panels = ("Model and LoRA", "Data", "Optimisation", "Methods", "Saving and logging", "Distributed")
        assert all(f"╭─ {panel} ─" in result.output for panel in panels)
        # about two lines a flag plus the panels' frames (225 lines before the panels and short help)
        assert len(lines) < 2.5 * len(flags) + 20, len(lines)


def test_on_off_flags_and_their_hidden_opposites(monkeypatch):
    from mlx_lora.training import loop

    seen = []
    monkeypatch.setattr(loop, "train", seen.append)
    for args in ([], ["--dora", "--no-prefix-cache"], ["--no-dora", "--prefix-cache"]):
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code == 0, result.output
    assert [(cfg.dora, cfg.prefix_cache) for cfg in seen] == [(False, True), (True, False), (False, True)]


def test_generate_echoes_the_prompt_on_stderr_and_shows_memory_in_a_readable_unit(llama):
    from mlx_lora.inference.generation import memory_text

    result = CliRunner().invoke(app, ["generate", "--model", str(llama), "--prompt", PROMPT, "--max-tokens", 4])
    assert result.exit_code == 0, result.output
    assert PROMPT not in result.stdout  # stdout is the generated text alone
    assert result.stderr.startswith(PROMPT + "\n")  # what the answer continues, before it
    stats = result.stderr.splitlines()[-1]
    assert re.search(r"peak memory \d+\.\d+ (MB|GB)$", stats) and "0.00 GB" not in stats
    assert (memory_text(0.0038), memory_text(2.5)) == ("3.8 MB", "2.50 GB")
