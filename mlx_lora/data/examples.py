"""Rows -> tokens + loss mask.

A row's mask marks the tokens the loss counts: the completion or assistant turns (everything with
--train-on-prompt), never padding.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mlx_lora.config.data import DataConfig
from mlx_lora.data.chat import encode_chat
from mlx_lora.data.mapping import iter_mapped
from mlx_lora.data.rows import PREFERENCE, Row, file_rows, row_format, split_files
from mlx_lora.data.sources import split_label, train_valid_streams
from mlx_lora.errors import UserError


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: token t is a training target (predicted from tokens < t)


# Characters read per token kept when a long text is cut (encode_prefix): a first guess, doubled
# while too few tokens come of it.
CHARS_PER_TOKEN = 8
CHUNK = 4096  # examples tokenized before they are laid end to end: a few MB, never one object per row


@dataclass(frozen=True, eq=False)
class ExampleSet(Sequence):
    """Examples laid end to end in three flat arrays. Indexing slices tokens and mask, which may
    be anything sliced like an array: a set read from --data-cache (cache.StoredArray) stays on
    disk, and a batch reads only its own rows."""

    tokens: np.ndarray  # (total,) int32
    mask: np.ndarray  # (total,) bool
    offsets: np.ndarray  # (N + 1,) int64: example i is [offsets[i], offsets[i + 1])

    @classmethod
    def concat(cls, parts: list["ExampleSet"]) -> "ExampleSet":
        lengths = np.concatenate([p.lengths for p in parts])
        return cls(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.mask for p in parts]),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )

    @classmethod
    def of(cls, examples: list[Example]) -> "ExampleSet":
        lengths = [len(ex.tokens) for ex in examples]
        return cls(
            np.concatenate([ex.tokens for ex in examples]).astype(np.int32),
            np.concatenate([ex.mask for ex in examples]).astype(bool),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )

    @cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64, in memory: all that ordering batches reads."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        start, end = self.offsets[i % len(self)], self.offsets[i % len(self) + 1]
        return Example(self.tokens[start:end], self.mask[start:end])


def encode_prefix(tokenizer, text: str, limit: int | None, **kwargs) -> list[int]:
    """The tokens of `text`, or where it is long, a prefix of them longer than `limit` (all a row
    keeps of it), read from a prefix of the text: memory follows `limit`, not the text.

    A cut can change the tokens at its end (a word split in two merges differently), so the text
    is encoded up to two cuts, one twice as far as the other, and only the tokens on which both
    agree are kept; the cuts move further until more than `limit` agree.
    """
    cut = CHARS_PER_TOKEN * (limit + 1) if limit else len(text)
    if len(text) <= 2 * cut:
        return tokenizer.encode(text, **kwargs)
    near = tokenizer.encode(text[:cut], **kwargs)
    while 2 * cut < len(text):
        far = tokenizer.encode(text[: 2 * cut], **kwargs)
        agreed = next((i for i, (a, b) in enumerate(zip(near, far)) if a != b), min(len(near), len(far)))
        if agreed > limit:
            return far[:agreed]
        near, cut = far, 2 * cut
    return tokenizer.encode(text, **kwargs)


CUT_FIELDS = ("content", "reasoning_content", "thinking")  # a message's free text, as long as a user makes it


def _cut_messages(row: dict, cut: int) -> dict:
    """The row with each message's free text cut to `cut` characters."""
    cut_message = lambda m: {k: v[:cut] if k in CUT_FIELDS and isinstance(v, str) else v for k, v in m.items()}
    return {**row, "messages": [cut_message(m) for m in row["messages"]]}


def encode_chat_prefix(where: str, tokenizer, row: dict, limit: int | None, **options) -> tuple[np.ndarray, np.ndarray]:
    """encode_chat's (tokens, mask), or where a message is long, a prefix of them longer than
    `limit`, read from the conversation with each message cut (encode_prefix's two cuts, tokens
    and mask both agreeing): memory follows `limit`, not the longest message."""
    longest = max(
        (len(v) for m in row["messages"] for k, v in m.items() if k in CUT_FIELDS and isinstance(v, str)), default=0
    )
    cut = CHARS_PER_TOKEN * (limit + 1) if limit else longest
    if longest <= 2 * cut:
        return encode_chat(where, tokenizer, row, **options)
    near = encode_chat(where, tokenizer, _cut_messages(row, cut), **options)
    while 2 * cut < longest:
        far = encode_chat(where, tokenizer, _cut_messages(row, 2 * cut), **options)
        same = [(a, m) == (b, n) for a, m, b, n in zip(*near, *far)]
        agreed = next((i for i, ok in enumerate(same) if not ok), len(same))
        if agreed > limit:
            return far[0][:agreed], far[1][:agreed]
        near, cut = far, 2 * cut
    return encode_chat(where, tokenizer, row, **options)


def encode_row(
    where: str,
    tokenizer,
    fmt: str,
    row: dict,
    train_on_prompt: bool,
    train_on_reasoning: bool = True,
    limit: int | None = None,
) -> Example:
    """A row's tokens and mask; with `limit`, those past it may be left out (the row is cut there)."""
    if fmt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"{where}: 'messages' rows need a tokenizer with a chat template; this one has none")
        options = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
        tokens, mask = encode_chat_prefix(where, tokenizer, row, limit, **options)
        mask[:1] = False  # nothing predicts the first token
        return Example(tokens, mask)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encode = lambda text, **kwargs: encode_prefix(tokenizer, text, limit, **kwargs)
    if fmt == "text":
        parts = [(encode(row["text"]) + eos, True)]
    else:
        parts = [
            (encode(row["prompt"]), train_on_prompt),
            (encode(row["completion"], add_special_tokens=False) + eos, True),
        ]
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in parts])
    mask = np.concatenate([np.full(len(ids), on, bool) for ids, on in parts])
    mask[:1] = False  # nothing predicts the first token
    return Example(tokens, mask)


def earlier(first: Row, row: Row) -> str:
    """How an error on `row` names an earlier row: its line in the same file, else where it is."""
    same_file = first.where.removesuffix(f":{first.number}") == row.where.removesuffix(f":{row.number}")
    return f"line {first.number}" if same_file and first.where.endswith(f":{first.number}") else first.where


def check_same_format(row: Row, fmt: str, first_fmt: str, first: Row) -> None:
    """One SFT row format per set; preference rows belong to the preference objectives."""
    if fmt == PREFERENCE:
        raise UserError(
            f"{row.where}: a preference row (prompt, chosen, rejected); train on it with "
            "--objective dpo, ipo, orpo or simpo, or write prompt/completion rows for sft"
        )
    if fmt != first_fmt:
        raise UserError(
            f"{row.where}: {fmt} row, but {earlier(first, row)} is a {first_fmt} row; use one format per set"
        )


def encode_rows(
    label: str,
    rows: Iterable[Row],
    tokenizer,
    max_seq_length: int,
    train_on_prompt: bool,
    log=print,
    train_on_reasoning: bool = True,
) -> ExampleSet:
    """Rows already in a row format -> examples; `label` names the set in warnings. Rows are read
    as they come, so a stream of them is never held whole."""
    first = None
    parts, examples, truncated, empty, shortest, count = [], [], 0, 0, None, 0
    for row in rows:
        count += 1
        fmt = row_format(row.where, row.fields)
        first = first or (fmt, row)
        check_same_format(row, fmt, *first)
        ex = encode_row(row.where, tokenizer, fmt, row.fields, train_on_prompt, train_on_reasoning, max_seq_length)
        if shortest is None or len(ex.tokens) < shortest[1]:
            shortest = (row.where, len(ex.tokens))
        if len(ex.tokens) > max_seq_length:
            truncated += 1
            ex = Example(ex.tokens[:max_seq_length], ex.mask[:max_seq_length])
        if ex.mask.any():
            examples.append(ex)
        else:
            empty += 1
        if len(examples) == CHUNK:
            parts.append(ExampleSet.of(examples))
            examples = []
    if not count:
        raise UserError(f"{label}: no rows")
    if truncated == count:
        raise UserError(
            f"{shortest[0]}: every row is longer than --max-seq-length {max_seq_length} (this one, the "
            f"shortest, has {shortest[1]} tokens); raise --max-seq-length or shorten the rows"
        )
    if truncated:
        log(
            f"warning: {truncated} of {count} rows in {label} are longer than "
            f"--max-seq-length {max_seq_length} and were truncated"
        )
    if empty:
        log(f"warning: {empty} rows in {label} have no tokens to learn from (after truncation) and were skipped")
    parts += [ExampleSet.of(examples)] if examples else []
    if not parts:
        raise UserError(f"{label}: no row has a token to learn from within --max-seq-length {max_seq_length}; raise it")
    return ExampleSet.concat(parts)


def load_split(
    path: Path, tokenizer, max_seq_length: int, train_on_prompt: bool, log=print, max_rows: int | None = None
) -> ExampleSet:
    """One JSONL file of rows in a row format."""
    return encode_rows(str(path), file_rows(path)[:max_rows], tokenizer, max_seq_length, train_on_prompt, log)


def load_sets(
    source, cfg: DataConfig, tokenizer, max_seq_length: int, train_on_prompt: bool, log=print, train_on_reasoning=True
) -> dict[str, ExampleSet]:
    """The training and validation examples of a source (sources.py), mapped as `cfg` says; rows
    are read, mapped and tokenized one at a time, and only the tokens are kept."""
    train, valid = train_valid_streams(source, cfg, log)
    masking = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
    return {
        role: encode_rows(
            split_label(source, cfg, role), iter_mapped(rows, cfg), tokenizer, max_seq_length, log=log, **masking
        )
        for role, rows in (("train", train), ("valid", valid))
    }


def load_dataset(
    data_dir: Path, tokenizer, max_seq_length: int, train_on_prompt: bool, splits=("train", "valid"), log=print
) -> dict[str, ExampleSet]:
    """Each <split>.jsonl of a directory (tests and benchmarks: the CLI reads through dataset.py)."""
    return split_files(data_dir, lambda path: load_split(path, tokenizer, max_seq_length, train_on_prompt, log), splits)
