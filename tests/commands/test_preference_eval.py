"""`mlx-lora eval` on preference rows: accuracy and margins of the adapter and the base, and DPO's
rewards against the base."""

import json

import mlx.core as mx
import pytest

from mlx_lora.commands.evaluate import run
from mlx_lora.config import EvalConfig
from mlx_lora.errors import UserError
from mlx_lora.reporting.results import table
from tests.conftest import preference_rows, trained_adapter, write_jsonl


@pytest.fixture
def pref_split(tmp_path):
    write_jsonl(tmp_path / "pref" / "test.jsonl", preference_rows(6))
    return tmp_path / "pref"


def test_preference_eval_compares_adapter_and_base(llama, pref_split, tmp_path):
    mx.random.seed(3)
    trained_adapter(llama, tmp_path / "adapter", size=0.5)
    out = tmp_path / "result.json"
    cfg = EvalConfig(
        model=str(llama),
        adapter_path=str(tmp_path / "adapter"),
        data=str(pref_split),
        compare_base=True,
        output=str(out),
    )
    result = run(cfg, log=lambda _: None)
    assert result["task"] == "preference" and result["rows"] == 6
    adapter, base = result["adapter"], result["base"]
    assert adapter["beta"] == 0.1  # not a preference-trained adapter: DPO's default
    # rewards are beta * (adapter - base) log-probs, so their margin is beta times the change of the margin
    assert adapter["reward_margin"] == pytest.approx(0.1 * (adapter["margin"] - base["margin"]), rel=1e-4)
    pairs = result["pairs"]
    assert base["accuracy"] == pytest.approx(sum(p["base"][0] > p["base"][1] for p in pairs) / 6)
    assert adapter["accuracy"] == pytest.approx(sum(p["adapter"][0] > p["adapter"][1] for p in pairs) / 6)
    assert json.loads(out.read_text()) == result
    lines = table(result).splitlines()
    assert lines[0].split() == ["base", "adapter", "change"]
    assert [line.split("  ")[0] for line in lines[1:]] == [
        "preference accuracy",
        "log-prob margin",
        "reward accuracy",
        "reward margin",
    ]


def test_base_alone_and_the_wrong_task(llama, pref_split, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./adapters to default to
    result = run(EvalConfig(model=str(llama), data=str(pref_split)), log=lambda _: None)
    assert "adapter" not in result and set(result["base"]) == {"accuracy", "margin"}
    with pytest.raises(UserError, match=r"test.jsonl:1: preference rows .*; evaluate them with --task preference"):
        run(EvalConfig(model=str(llama), data=str(pref_split), task="loss"), log=lambda _: None)


def test_cli_train_then_eval_reads_the_objective_and_beta(llama, pref_split, tmp_path):
    from typer.testing import CliRunner

    from mlx_lora.cli import app

    write_jsonl(pref_split / "train.jsonl", preference_rows(6))
    write_jsonl(pref_split / "valid.jsonl", preference_rows(2, 20))
    out = tmp_path / "adapter"
    flags = ["--model", str(llama), "--data", str(pref_split), "--adapter-path", str(out), "--iters", "2"]
    flags += ["--batch-size", "2", "--objective", "simpo", "--beta", "1.5", "--simpo-gamma", "0.3", "--save-every", "0"]
    trained = CliRunner().invoke(app, ["train", *flags])
    assert trained.exit_code == 0, trained.output
    training = json.loads((out / "adapter_config.json").read_text())["training"]
    assert (training["objective"], training["beta"], training["simpo_gamma"]) == ("simpo", 1.5, 0.3)
    evaluated = CliRunner().invoke(app, ["eval", "--adapter-path", str(out), "--data", str(pref_split)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "preference accuracy" in evaluated.output and "reward accuracy" in evaluated.output
    result = run(EvalConfig(adapter_path=str(out), data=str(pref_split)), log=lambda _: None)
    assert result["adapter"]["beta"] == 1.5
