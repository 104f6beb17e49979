"""GRPO's options: declared once in TrainConfig, each bad value one line naming the flag."""

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import TrainConfig


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--group-size", "1"], "--group-size must be at least 2, got 1"),
        (["--max-completion-tokens", "0"], "--max-completion-tokens must be at least 1, got 0"),
        (["--grpo-iterations", "0"], "--grpo-iterations must be at least 1, got 0"),
        (["--temperature", "0"], "--temperature must be positive (a group needs different completions), got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--epsilon", "1"], "--epsilon must be in (0, 1), got 1.0"),
        (["--epsilon-high", "-0.1"], "--epsilon-high must be positive, got -0.1"),
        (["--loss-type", "ppo"], "--loss-type must be one of grpo, dr_grpo, dapo, gspo, got 'ppo'"),
        (["--beta", "-1"], "--beta must be 0 or more, got -1.0"),
        (["--rewards", "bleu"], "--rewards: unknown reward 'bleu'; use exact-match, format or python:FILE.py:FUNCTION"),
        (["--rewards", ","], "--rewards is empty"),
        (["--format-regex", "(#"], "--format-regex '(#' is not a regular expression"),
        (
            ["--rewards", "exact-match,format", "--reward-weights", "1"],
            "--reward-weights gives 1 weights for 2 rewards",
        ),
        (["--reward-weights", "heavy"], "--reward-weights: 'heavy' is not a number"),
        (["--pack"], "--pack does not apply to --objective grpo: each completion is scored whole"),
        (["--train-on-prompt"], "--train-on-prompt does not apply to --objective grpo"),
        (["--beta", "0.04", "--init", "pissa"], "--init pissa moves part of the base into the adapter"),
        (["--stream-prefix", "on"], "--stream-prefix on does not apply to --objective grpo"),
        (
            ["--early-stopping-patience", "2"],
            "--early-stopping-patience watches the val loss; --objective grpo validates a mean reward",
        ),
    ],
)
def test_bad_grpo_options_are_named(flags, message):
    result = CliRunner().invoke(app, ["train", "--objective", "grpo", *flags])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--group-size", "4"], "--group-size applies to --objective grpo, not sft"),
        (["--objective", "dpo", "--loss-type", "gspo"], "--loss-type applies to --objective grpo, not dpo"),
    ],
)
def test_grpo_options_belong_to_grpo(flags, message):
    result = CliRunner().invoke(app, ["train", *flags])
    assert result.exit_code == 2 and message in result.output


def test_grpo_defaults_are_trls():
    cfg = TrainConfig(objective="grpo")
    assert (cfg.group_size, cfg.beta_value, cfg.epsilon, cfg.epsilon_high_value, cfg.loss_type) == (
        8,
        0.0,
        0.2,
        0.2,
        "dapo",
    )
    assert (cfg.temperature, cfg.top_p, cfg.grpo_iterations) == (1.0, 1.0, 1)
    assert TrainConfig(rewards="exact-match, format", reward_weights="1, 0.5").reward_weight_values == [1.0, 0.5]
    assert TrainConfig(rewards="exact-match,format").reward_weight_values == [1.0, 1.0]


def test_the_learning_rate_defaults_by_objective_and_help_says_so():
    """Left out, --learning-rate is the objective's (sft's 1e-3 as before, grpo's 1e-5); given, it wins."""
    assert {o: TrainConfig(objective=o).learning_rate_value for o in ("sft", "dpo", "orpo", "grpo")} == {
        "sft": 1e-3,
        "dpo": 1e-3,
        "orpo": 1e-3,
        "grpo": 1e-5,
    }
    assert TrainConfig(objective="grpo").learning_rate_text == "1e-05 (grpo's default)"
    given = TrainConfig(objective="grpo", learning_rate=3e-5)
    assert (given.learning_rate_value, given.learning_rate_text) == (3e-5, "3e-05")
    (field,) = [f for f in fields(TrainConfig) if f.name == "learning_rate"]  # what --help prints
    assert (
        "(default by --objective: sft 0.001, dpo 0.001, ipo 0.001, orpo 0.001, simpo 0.001, grpo 1e-05)"
        in (field.metadata["help"])
    )
    refused = CliRunner().invoke(app, ["train", "--objective", "grpo", "--learning-rate", "0"])
    assert refused.exit_code == 2 and "--learning-rate must be positive, got 0.0" in refused.output
