"""What a command reads: the training and validation sets of a source, or one split of it, as
examples (or preference pairs), through --data-cache. train, info and eval load data here alone,
so `info` sizes the very sets `train` reads and `eval` reads a split the way training did."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.config.data import DataConfig
from mlx_lora.data.cache import tokenized_sets, tokenized_split
from mlx_lora.data.examples import ExampleSet, encode_rows
from mlx_lora.data.mapping import map_rows
from mlx_lora.data.preference import Pair, load_preference, preference_dir
from mlx_lora.data.rows import Row
from mlx_lora.data.sources import split_label, split_rows

TRAINING = ("train", "valid")


@dataclass(frozen=True)
class Encoding:
    """How rows become examples."""

    max_seq_length: int
    train_on_prompt: bool = False
    train_on_reasoning: bool = True
    first: int | None = None  # only the split's first rows (eval's --max-examples)


@dataclass
class DataSplit:
    examples: ExampleSet | list[Pair]
    rows: Callable[[], list[Row]]  # the mapped rows, read when first asked for (a cached loss-only eval reads none)


def load_splits(
    source,
    data: DataConfig,
    tokenizer,
    encoding: Encoding,
    splits: tuple[str, ...] = TRAINING,
    *,
    objective: str | None = None,
    cache_dir: Path | None = None,
    log=print,
) -> dict[str, DataSplit]:
    """train and valid as training reads them (`objective`: a preference objective's pairs), or one
    split by the name `sources.split_rows` takes; tokenized rows kept in and read from `cache_dir`."""
    if splits != TRAINING:
        (wanted,) = splits
        return {wanted: _one_split(source, data, wanted, tokenizer, encoding, cache_dir, log)}
    if objective is not None:
        sets = load_preference(preference_dir(source, objective), tokenizer, encoding.max_seq_length)
    else:
        limit, on_prompt = encoding.max_seq_length, encoding.train_on_prompt
        reasoning = encoding.train_on_reasoning
        sets = tokenized_sets(source, data, tokenizer, limit, on_prompt, cache_dir, log, train_on_reasoning=reasoning)
    return {role: DataSplit(sets[role], _rows(source, data, role, None, log)) for role in TRAINING}


def _rows(source, data: DataConfig, wanted: str, first: int | None, log) -> Callable[..., list[Row]]:
    rows = []

    def read(say=log) -> list[Row]:
        if not rows:
            rows.extend(map_rows(split_rows(source, data, wanted, say)[:first], data))
        return rows

    return read


def _one_split(source, data: DataConfig, wanted: str, tokenizer, encoding: Encoding, cache_dir, log) -> DataSplit:
    rows = _rows(source, data, wanted, encoding.first, log)

    def tokenize(say) -> ExampleSet:
        mapped = rows(say)  # first: a split that does not exist is refused by name
        label = split_label(source, data, wanted)
        masking = dict(train_on_prompt=encoding.train_on_prompt, train_on_reasoning=encoding.train_on_reasoning)
        return encode_rows(label, mapped, tokenizer, encoding.max_seq_length, log=say, **masking)

    first = {} if encoding.first is None else {"first": encoding.first}  # else the same key as training's
    key = dict(max_seq_length=encoding.max_seq_length, train_on_prompt=encoding.train_on_prompt, **first)
    key |= {} if encoding.train_on_reasoning else {"train_on_reasoning": False}  # as cache.tokenized_sets keys
    return DataSplit(tokenized_split(source, data, wanted, tokenizer, cache_dir, tokenize, log, **key), rows)
