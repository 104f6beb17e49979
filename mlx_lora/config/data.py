"""Where the rows come from and how their fields become text, prompt+completion or messages.

Shared by `train` and `eval`, so a set trained with some mapping is evaluated with the same flags.
"""

from dataclasses import dataclass

from mlx_lora.config.fields import opt

VALID_NAMES = ("validation", "valid", "val")  # the first that exists is the validation split


@dataclass(frozen=True)
class DataConfig:
    """The source's configuration and splits, and the mapping from a row's fields to a row format."""

    data: str | None = opt(
        None,
        "Directory of <split>.jsonl files (train.jsonl, valid.jsonl, test.jsonl), a .jsonl/.json/.parquet/"
        ".csv/.arrow file, a dataset directory or a Hugging Face dataset id such as openai/gsm8k "
        "(default: the bundled arithmetic set).",
    )
    data_config: str | None = opt(
        None, "Hugging Face dataset configuration (subset) to load, e.g. main for openai/gsm8k."
    )
    train_split: str = opt("train", "Split to train on (a directory: <name>.jsonl).")
    valid_split: str | None = opt(
        None,
        f"Split to validate on (default: {', '.join(VALID_NAMES)}, whichever exists; "
        "without one, --valid-fraction of the training split is held out).",
    )
    test_split: str = opt("test", "Split `eval --split test` reads.")
    valid_fraction: float = opt(
        0.05, "Without a validation split, hold out this fraction of the training rows (seeded, so eval finds them)."
    )
    text_field: str | None = opt(None, "Train on this column as plain text (a text row).")
    prompt_field: str | None = opt(None, "Column holding the prompt (with --completion-field or a template).")
    completion_field: str | None = opt(None, "Column holding the completion, the part the loss counts.")
    messages_field: str | None = opt(
        None,
        "Column holding a conversation: a list of {role, content} or ShareGPT {from, value} turns "
        "(human/gpt/system), e.g. conversations.",
    )
    prompt_template: str | None = opt(
        None, "Prompt built from a row's columns, e.g. 'Q: {question}\\nA:' ({{ }} for braces; \\n is a newline)."
    )
    completion_template: str | None = opt(None, "Completion built from a row's columns, e.g. ' {answer}'.")

    def problems(self) -> list[str]:
        p = []
        if not 0 < self.valid_fraction < 1:
            p.append(f"--valid-fraction must be between 0 and 1, got {self.valid_fraction}")
        for side in ("prompt", "completion"):
            if getattr(self, f"{side}_field") and getattr(self, f"{side}_template"):
                p.append(f"--{side}-field and --{side}-template both given; the {side} is one or the other")
        has_prompt = bool(self.prompt_field or self.prompt_template)
        has_completion = bool(self.completion_field or self.completion_template)
        if has_prompt != has_completion:
            given, missing = ("prompt", "completion") if has_prompt else ("completion", "prompt")
            p.append(f"a {given} is mapped but no {missing}: add --{missing}-field or --{missing}-template")
        formats = [
            name
            for name, on in (
                ("--text-field", self.text_field),
                ("prompt/completion", has_prompt or has_completion),
                ("--messages-field", self.messages_field),
            )
            if on
        ]
        if len(formats) > 1:
            p.append(f"{' and '.join(formats)} both given; map the rows to one format")
        return p

    @property
    def mapped(self) -> bool:
        """Whether any field or template mapping is set (else rows must already be in a row format)."""
        return any(
            (
                self.text_field,
                self.prompt_field,
                self.completion_field,
                self.messages_field,
                self.prompt_template,
                self.completion_template,
            )
        )
