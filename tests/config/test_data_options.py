import pytest

from mlx_lora.config import EvalConfig, TrainConfig, build_config, load_yaml
from mlx_lora.data.mapping import unescape
from mlx_lora.errors import UserError


def test_yaml_sets_the_data_options_of_train_and_eval(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: openai/gsm8k\n"
        "data-config: main\n"
        "valid_fraction: 0.1\n"
        'prompt_template: "Q: {question}\\nA:"\n'  # YAML's own escape: a real newline
        "completion_template: ' {answer}'\n"
    )
    for cls in (TrainConfig, EvalConfig):
        cfg = build_config(cls, load_yaml(path, cls), {"data_config": None})
        assert (cfg.data, cfg.data_config, cfg.valid_fraction) == ("openai/gsm8k", "main", 0.1)
        assert cfg.prompt_template == "Q: {question}\nA:" and cfg.completion_template == " {answer}"


def test_a_typed_backslash_n_is_a_newline():
    assert unescape("Q: {question}\\nA:\\t\\\\") == "Q: {question}\nA:\t\\"
    assert unescape("Q: {question}\nA:") == "Q: {question}\nA:"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"valid_fraction": 1.0}, "--valid-fraction must be between 0 and 1, got 1.0"),
        (
            {"prompt_field": "q"},
            "a prompt is mapped but no completion: add --completion-field or --completion-template",
        ),
        ({"completion_template": "{a}"}, "a completion is mapped but no prompt"),
        (
            {"prompt_field": "q", "prompt_template": "{q}", "completion_field": "a"},
            "--prompt-field and --prompt-template",
        ),
        ({"text_field": "t", "messages_field": "m"}, "--text-field and --messages-field both given"),
    ],
)
def test_mapping_flags_that_cannot_go_together(values, message):
    for cls in (TrainConfig, EvalConfig):
        with pytest.raises(UserError, match=message):
            build_config(cls, {}, values)
