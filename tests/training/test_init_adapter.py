"""`train --init-adapter DIR`: a new run whose adapter starts as a saved one, in any format the
loader reads, with its shape; a fresh optimizer at step 0; for every objective. What conflicts
with it is refused in one line."""

import json

import mlx.core as mx
import pytest
from conftest import preference_rows, random_adapter, write_jsonl
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.convert import convert
from mlx_lora.commands.evaluate import run as evaluate
from mlx_lora.config import ConvertConfig, EvalConfig, LoRAConfig, TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import read_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, describe, save_adapter
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.training.loop import build_run, train

# Not the defaults (q_proj,v_proj, r 8, alpha 16, 16 blocks): the run must take them from the adapter.
SHAPE = LoRAConfig(targets="q_proj,o_proj", num_layers=2, rank=4, alpha=8)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def sft(llama, tmp_path_factory):
    """An adapter on the tiny llama with random A and B, as an SFT run would leave one."""
    out = tmp_path_factory.mktemp("sft")
    random_adapter(llama, out, SHAPE)
    return out


def in_format(sft, fmt: str, tmp_path):
    if fmt == "mlx":
        return sft
    convert(ConvertConfig(str(sft), str(tmp_path / fmt), to=fmt), log=quiet)
    return tmp_path / fmt


def trainable(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("fmt", ["mlx", "peft", "mlx-lm"])
def test_a_new_run_starts_from_the_adapter_as_eval_loads_it(llama, tiny_data, sft, tmp_path, fmt):
    """The step-0 validation loss is the one `eval` reports for the adapter on the same rows: the
    same weights through the same batches and ops. Without the adapter's weights it is the base's."""
    start = in_format(sft, fmt, tmp_path)
    evaluated = evaluate(
        EvalConfig(model=str(llama), adapter_path=str(start), data=str(tiny_data), split="valid", task="loss"), quiet
    )
    cfg = TrainConfig(
        data=str(tiny_data),
        adapter_path=str(tmp_path / "new"),
        init_adapter=str(start),
        iters=1,
        batch_size=16,  # eval's, so both read the 8 valid rows in one batch
        val_batches=-1,
        prefix_cache=False,  # as eval: the whole model on every row
        val_every=0,
    )
    lines = []
    result = train(cfg, log=lines.append)
    assert result.val_losses[0] == evaluated["adapter"]["loss"]
    assert any(line.startswith(f"starting from the adapter in {start}") for line in lines)
    saved = json.loads((tmp_path / "new" / ADAPTER_CONFIG).read_text())
    # the adapter's shape, on the base it named (no --model was given), the new run's base fingerprint
    assert (saved["rank"], saved["alpha"], saved["layer_indices"]) == (4, 8, [2, 3])
    assert saved["modules"] == read_adapter(sft)[0].modules
    assert saved["base_fingerprint"] == json.loads((sft / ADAPTER_CONFIG).read_text())["base_fingerprint"]
    assert saved["training"]["init_adapter"] == str(start)


@pytest.fixture
def pref_data(tmp_path):
    write_jsonl(tmp_path / "pref" / "train.jsonl", preference_rows(8))
    write_jsonl(tmp_path / "pref" / "valid.jsonl", preference_rows(4, 20))
    return tmp_path / "pref"


def test_dpo_starts_from_the_adapter_with_a_fresh_optimizer(llama, sft, pref_data, tmp_path):
    """The weights are the adapter's to the bit, the optimizer has taken no step and holds no
    moments, and the run is at step 0; the reference stays the base alone, so the first DPO loss
    is no longer ln 2."""
    cfg = TrainConfig(
        data=str(pref_data),
        adapter_path=str(tmp_path / "dpo"),
        init_adapter=str(sft),
        objective="dpo",
        iters=2,
        batch_size=2,
        val_every=0,
    )
    run = build_run(cfg, log=quiet)
    weights = read_adapter(sft)[1]
    assert trainable(run.base.model).keys() == weights.keys()
    assert all(mx.array_equal(v, weights[k]).item() for k, v in trainable(run.base.model).items())
    assert run.progress.step == 0 and run.progress.batches_seen == 0
    assert run.optimizer.state["step"].item() == 0
    assert all(not v.any().item() for k, v in tree_flatten(run.optimizer.state) if k.endswith((".m", ".v")))
    run.monitor.close()
    result = train(cfg, log=quiet)
    assert result.val_losses[0] != pytest.approx(0.6931, abs=1e-3)


def shipped_adapter(out):
    """An adapter on the shipped model (what `train` would save) with random B."""
    mx.random.seed(2)
    base = load_base(None)
    cfg = LoRAConfig(rank=4, alpha=4, num_layers=2)
    modules = apply_lora(base.model, cfg)
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    save_adapter(out, base.model, describe(base, cfg, modules))
    return out


def test_grpo_starts_from_the_adapter_and_trains(tmp_path):
    start = shipped_adapter(tmp_path / "sft")
    flags = ["--iters", "1", "--group-size", "2", "--batch-size", "2", "--max-completion-tokens", "6"]
    out = tmp_path / "grpo"
    cfg = TrainConfig(
        data="data", adapter_path=str(out), init_adapter=str(start), objective="grpo", group_size=2, batch_size=2
    )
    run = build_run(cfg, log=quiet)
    weights = read_adapter(start)[1]
    assert all(mx.array_equal(v, weights[k]).item() for k, v in trainable(run.base.model).items())
    assert trainable(run.base.model).keys() == weights.keys() and run.progress.step == 0
    run.monitor.close()
    args = ["train", "--objective", "grpo", *flags, "--val-batches", "1", "--init-adapter", str(start)]
    result = CliRunner().invoke(app, [*args, "--adapter-path", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (saved["rank"], saved["alpha"], saved["training"]["objective"]) == (4, 4, "grpo")


def test_a_resumed_run_that_started_from_an_adapter_continues(llama, tiny_data, sft, tmp_path):
    """Its checkpoint holds the adapter's shape and the run's options, so --resume alone continues it."""
    out = tmp_path / "run"
    args = ["train", "--model", str(llama), "--data", str(tiny_data), "--init-adapter", str(sft)]
    first = CliRunner().invoke(app, [*args, "--iters", "2", "--save-every", "1", "--adapter-path", str(out)])
    assert first.exit_code == 0, first.output
    resumed = CliRunner().invoke(app, ["train", "--resume", str(out / "checkpoints" / "step-0000001")])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "starting from the adapter" not in resumed.output


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--rank", "16"],
            "--init-adapter {sft}: the adapter's rank is 4 but --rank 16 was given; drop --rank: "
            "a run started from an adapter keeps its shape",
        ),
        (
            ["--targets", "all-linear"],
            "--init-adapter {sft}: the adapter's targets is 'q_proj,o_proj' but --targets 'all-linear' was given; "
            "drop --targets: a run started from an adapter keeps its shape",
        ),
        (
            ["--resume", "{sft}"],
            "--init-adapter starts a new run from an adapter, --resume continues a run from its checkpoint; "
            "give one of them",
        ),
        (
            ["--adapter-path", "{sft}"],
            "--adapter-path {sft} is the adapter --init-adapter starts from; give the new run its own --adapter-path",
        ),
    ],
)
def test_conflicts_are_refused_in_one_line(llama, tiny_data, sft, tmp_path, flags, message):
    flags = [f.format(sft=sft) for f in flags]
    args = ["train", "--model", str(llama), "--data", str(tiny_data), "--init-adapter", str(sft), "--iters", "1"]
    out = [] if "--adapter-path" in flags else ["--adapter-path", str(tmp_path / "new")]
    result = CliRunner().invoke(app, [*args, *out, *flags])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message.format(sft=sft)}"]
    assert not (tmp_path / "new").exists()


def test_dropout_may_change(llama, tiny_data, sft, tmp_path):
    cfg = TrainConfig(
        data=str(tiny_data), adapter_path=str(tmp_path / "new"), init_adapter=str(sft), dropout=0.1, iters=1
    )
    run = build_run(cfg, log=quiet)
    assert run.adapter.lora.dropout == 0.1 and run.adapter.lora.rank == 4
    assert {round(1 - layer.dropout._p_1, 6) for layer in lora_layers(run.base.model).values()} == {0.1}
    run.monitor.close()


def test_an_adapter_of_another_base_is_refused_naming_both(hf_models, sft, tiny_data, tmp_path):
    cfg = TrainConfig(
        model=str(hf_models["qwen2"]), data=str(tiny_data), adapter_path=str(tmp_path / "new"), init_adapter=str(sft)
    )
    with pytest.raises(UserError) as refused:
        build_run(cfg, log=quiet)
    message = str(refused.value)
    assert "\n" not in message and str(hf_models["llama"].resolve()) in message
    assert str(hf_models["qwen2"].resolve()) in message and "pass the matching --model" in message
