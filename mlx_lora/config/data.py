"""Where the rows come from and how their fields become text, prompt+completion or messages.

Shared by `train` and `eval`, so a set trained with some mapping is evaluated with the same flags.
"""

from dataclasses import dataclass, fields

from mlx_lora.config.fields import DATA, opt

VALID_NAMES = ("validation", "valid", "val")  # the first that exists is the validation split


@dataclass(frozen=True)
class DataConfig:
    """The source's configuration and splits, and the mapping from a row's fields to a row format."""

    # A directory of <split>.jsonl files, one .jsonl/.json/.parquet/.csv/.arrow file, a dataset
    # directory or a Hugging Face dataset id such as openai/gsm8k.
    data: str | None = opt(None, "Data directory, file or hub dataset id (default: bundled).", panel=DATA)
    data_config: str | None = opt(None, "Hub dataset configuration, e.g. main for openai/gsm8k.", panel=DATA)
    train_split: str = opt("train", "Split to train on.", panel=DATA)
    # Without a validation split, --valid-fraction of the training split is held out.
    valid_split: str | None = opt(None, f"Split to validate on (default: {'|'.join(VALID_NAMES)}).", panel=DATA)
    test_split: str = opt("test", "Split `eval --split test` reads.", panel=DATA)
    # Seeded with a fixed seed, so eval finds the same rows.
    valid_fraction: float = opt(0.05, "Held out for validation when there is no split.", panel=DATA)
    text_field: str | None = opt(None, "Column to train on as plain text.", panel=DATA)
    prompt_field: str | None = opt(None, "Column holding the prompt.", panel=DATA)
    completion_field: str | None = opt(None, "Column holding the completion (the loss counts it).", panel=DATA)
    # A list of {role, content} or ShareGPT {from, value} turns (human/gpt/system).
    messages_field: str | None = opt(None, "Column holding a conversation, e.g. conversations.", panel=DATA)
    # {column} fields; {{ }} for braces; a typed \n is a newline.
    prompt_template: str | None = opt(None, "Prompt from a row's columns, e.g. 'Q: {question}\\nA:'.", panel=DATA)
    completion_template: str | None = opt(None, "Completion from columns, e.g. ' {answer}'.", panel=DATA)
    # Tokenized rows are reused, read from disk as batches need them, by a later run (train or
    # eval) with the same data, tokenizer, mapping, --max-seq-length and --train-on-prompt. By
    # default in $MLX_LORA_CACHE/tokenized, else the platform's cache directory (~/.cache/mlx-lora,
    # $XDG_CACHE_HOME/mlx-lora, ~/Library/Caches/mlx-lora on macOS); at most 10 GB, least recently
    # used entries removed first.
    data_cache: str | None = opt(
        None, "Directory to keep tokenized rows in (default: mlx-lora's cache directory).", panel=DATA
    )
    cache_data: bool = opt(
        True,
        "Keep tokenized rows for later runs (--no-data-cache: tokenize each run).",
        off="--no-data-cache",
        panel=DATA,
    )

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


def data_part(cfg: DataConfig) -> DataConfig:
    """The data options of a config that extends DataConfig (train's, eval's), as data/ takes them."""
    return DataConfig(**{f.name: getattr(cfg, f.name) for f in fields(DataConfig)})
