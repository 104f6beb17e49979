import pytest

from mlx_lora.config import TrainConfig, build_config, load_yaml
from mlx_lora.errors import UserError


def test_precedence_is_command_line_then_file_then_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 16\nlearning_rate: 1e-4\ntargets: [q_proj, k_proj]\n")
    cfg = build_config(TrainConfig, load_yaml(path), {"rank": 4, "alpha": None})
    assert cfg.rank == 4  # flag beats file
    assert cfg.learning_rate == 1e-4  # file beats default (YAML reads 1e-4 as a string)
    assert cfg.targets == "q_proj,k_proj"
    assert cfg.alpha == TrainConfig.alpha  # default


def test_yaml_problems_are_all_reported_with_line_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 8\nlearnig_rate: 0.1\nbatch_size: many\n")
    with pytest.raises(UserError) as e:
        load_yaml(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}:2: unknown key 'learnig_rate' (did you mean 'learning_rate'?)"
    assert lines[1] == f"{path}:3: batch_size must be a number, got 'many'"


def test_invalid_values_are_reported_together():
    with pytest.raises(UserError) as e:
        build_config(TrainConfig, {}, {"rank": 0, "dropout": 1.5, "batch_size": 0})
    message = str(e.value)
    assert "--rank must be at least 1" in message and "--dropout" in message and "--batch-size" in message


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 8\nalpha: [1, 2\n")
    with pytest.raises(UserError, match=rf"{path}:\d+: not valid YAML"):
        load_yaml(path)


def test_iters_and_epochs_are_one_or_the_other(tmp_path):
    with pytest.raises(UserError, match="--iters and --epochs both given"):
        build_config(TrainConfig, {}, {"iters": 5, "epochs": 1.0})
    path = tmp_path / "run.yaml"
    path.write_text("iters: 5\nepochs: 2\n")
    with pytest.raises(UserError, match="both iters and epochs are set"):
        load_yaml(path)
    path.write_text("epochs: 2\n")
    assert build_config(TrainConfig, load_yaml(path), {"iters": 7}).epochs is None  # the flag wins
    assert build_config(TrainConfig, load_yaml(path), {}).epochs == 2
