import mlx.core as mx
import pytest
from conftest import CFG_A, CFG_B, save_random_adapter
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import GenerateConfig, LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.inference.adapter_set import AdapterSet, load_adapters, parse_adapters
from mlx_lora.model import kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import lora_layers

TOKENS = mx.array([[1, 50, 51, 52, 53]])


@pytest.fixture(scope="module")
def two_adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return save_random_adapter(llama, root / "a", CFG_A, 1), save_random_adapter(llama, root / "b", CFG_B, 2)


def _deltas(model_dir, adapter_dir):
    """{module path: (weight of the base, delta)} from a model with only that adapter loaded."""
    from mlx_lora.formats.loader import load_adapter

    base = load_base(str(model_dir))
    load_adapter(base, adapter_dir)
    return {p: (l.linear.weight, l.delta()) for p, l in lora_layers(base.model).items()}


def test_switching_and_unloading_give_bit_identical_logits(llama, two_adapters):
    a, b = two_adapters
    base_logits = load_base(str(llama)).model(TOKENS)
    from mlx_lora.formats.loader import load_for_inference

    only_a = load_for_inference(str(llama), str(a)).model(TOKENS)
    only_b = load_for_inference(str(llama), str(b)).model(TOKENS)
    adapters = AdapterSet(load_base(str(llama)))
    assert adapters.load_adapter(a) == "a" and adapters.load_adapter(b) == "b"
    model = adapters.base.model
    assert adapters.active is None and mx.array_equal(model(TOKENS), base_logits)
    adapters.set_adapter("a")
    assert mx.array_equal(model(TOKENS), only_a)
    adapters.set_adapter("b")
    assert mx.array_equal(model(TOKENS), only_b)
    assert not mx.array_equal(only_a, only_b) and not mx.array_equal(only_a, base_logits)
    adapters.set_adapter(None)
    assert mx.array_equal(model(TOKENS), base_logits)
    adapters.set_adapter("a")
    base = adapters.unload()
    assert mx.array_equal(base.model(TOKENS), base_logits)
    assert not lora_layers(base.model)


def test_weighted_combination_is_the_weighted_sum_of_deltas(llama, two_adapters):
    a, b = two_adapters
    adapters = AdapterSet(load_base(str(llama)))
    adapters.load_adapter(a)
    adapters.load_adapter(b)
    adapters.set_adapter(adapters.add_weighted_adapter({"a": 0.7, "b": -0.3}, "mix"))
    combined = lora_layers(adapters.base.model)
    deltas_a, deltas_b = _deltas(llama, a), _deltas(llama, b)
    assert set(combined) == set(deltas_a) | set(deltas_b)
    explicit = load_base(str(llama))
    for path, layer in combined.items():
        expected = 0.7 * deltas_a[path][1] if path in deltas_a else 0
        expected = expected + (-0.3 * deltas_b[path][1] if path in deltas_b else 0)
        assert mx.allclose(layer.delta(), expected, atol=1e-6)
        module = dict(explicit.model.named_modules())[path]
        module.weight = module.weight + expected  # the merged model W + Σ w_i Δ_i, built by hand
    assert mx.allclose(adapters.base.model(TOKENS), explicit.model(TOKENS), atol=1e-4)


def test_bad_names_and_refused_adapters_leave_the_set_usable(hf_models, two_adapters, tmp_path):
    a, _ = two_adapters
    base_logits = load_base(str(hf_models["llama"])).model(TOKENS)
    adapters = AdapterSet(load_base(str(hf_models["llama"])))
    adapters.load_adapter(a)
    with pytest.raises(UserError, match="no adapter named 'zz'"):
        adapters.set_adapter("zz")
    with pytest.raises(UserError, match="already loaded"):
        adapters.load_adapter(a, name="a")
    qwen_adapter = save_random_adapter(hf_models["qwen2"], tmp_path / "q", CFG_A, 3)
    with pytest.raises(UserError, match="shapes differ"):
        adapters.load_adapter(qwen_adapter)
    assert adapters.names == ["a"]
    adapters.unload()
    assert mx.array_equal(adapters.base.model(TOKENS), base_logits)


def test_adapter_specs_with_weights(tmp_path):
    assert parse_adapters(["x", "y:0.3"], None) == [("x", None), ("y", 0.3)]
    assert parse_adapters(["x", "y"], "0.7, 0.3") == [("x", 0.7), ("y", 0.3)]
    (tmp_path / "run:2").mkdir()
    assert parse_adapters([str(tmp_path / "run:2")], None) == [(str(tmp_path / "run:2"), None)]
    with pytest.raises(UserError, match="2 values for 1"):
        parse_adapters(["x"], "1,2")


def test_generate_with_several_adapters(llama, two_adapters):
    a, b = two_adapters
    run = lambda *args: CliRunner().invoke(
        app, ["generate", "--model", str(llama), "--max-tokens", "8", "--prompt", "Q: 1 + 2", *args]
    )
    outputs = {
        name: run(*args)
        for name, args in {
            "a": ["--adapter-path", str(a)],
            "a+b": ["--adapter-path", str(a), "--adapter-path", str(b)],
            "weights": ["--adapter-path", str(a), "--adapter-path", str(b), "--adapter-weights", "1,1"],
            "colon": ["--adapter-path", f"{a}:1", "--adapter-path", f"{b}:1.0"],
            "a/2": ["--adapter-path", f"{a}:0.5"],
        }.items()
    }
    assert all(r.exit_code == 0 for r in outputs.values()), {k: r.output for k, r in outputs.items()}
    text = {k: r.stdout for k, r in outputs.items()}
    assert text["a+b"] == text["weights"] == text["colon"]
    assert text["a"] != text["a+b"]
    assert "generated at" in outputs["a"].stderr


def test_dora_adapters_switch_but_do_not_combine(llama, two_adapters, tmp_path):
    from mlx_lora.formats.loader import load_for_inference

    dora = save_random_adapter(llama, tmp_path / "d", LoRAConfig(targets="q_proj", num_layers=1, rank=2, dora=True), 4)
    adapters = AdapterSet(load_base(str(llama)))
    adapters.load_adapter(two_adapters[0])
    adapters.set_adapter(adapters.load_adapter(dora))
    assert mx.array_equal(adapters.base.model(TOKENS), load_for_inference(str(llama), str(dora)).model(TOKENS))
    with pytest.raises(UserError, match="DoRA adapters cannot be combined"):
        adapters.add_weighted_adapter({"a": 0.5, "d": 0.5})


@pytest.mark.parametrize("off", [False, True])
def test_generate_and_chat_run_on_the_cpu_kernels_unless_switched_off(llama, off, monkeypatch):
    if off:
        monkeypatch.setenv(kernel_choice.ENV, "off")
    model = load_adapters(GenerateConfig(model=str(llama))).base.model
    assert hasattr(model.layers[0].mlp, "on_cpu_kernels") != off
    assert hasattr(model.layers[0].self_attn, "on_cpu_kernels") != off
