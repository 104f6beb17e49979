"""Preference rows -> pairs of Examples sharing the prompt, and their batches.

A {prompt, chosen, rejected} row becomes a Pair: the prompt followed by each completion, the loss
mask on the completion tokens only. A batch of B pairs is collated as 2B rows, the B chosen
first, then the B rejected (TRL's concatenated layout), so one forward scores both sides.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lora.data.batches import collate
from mlx_lora.data.examples import Example, encode_row
from mlx_lora.data.rows import PREFERENCE, read_rows, row_format, split_files
from mlx_lora.data.sources import JsonlSource
from mlx_lora.errors import UserError

SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    @property
    def tokens(self) -> np.ndarray:
        """Both sides' tokens: what batching sorts by and throughput counts (a pair costs both)."""
        return np.concatenate([self.chosen.tokens, self.rejected.tokens])


def _encode_chat(where: str, tokenizer, prompt: list[dict], replies: list[dict]) -> Example:
    """The prompt rendered with the generation prompt, then the replies: loss on the replies only."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{where}: conversational preference rows need a tokenizer with a chat template")
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + replies, tokenize=False, add_generation_prompt=False)
    if not full.startswith(before):
        raise UserError(
            f"{where}: this tokenizer's chat template does not render the prompt as a prefix; use text rows"
        )
    head = np.asarray(tokenizer.encode(before, add_special_tokens=False), np.int32)
    tail = np.asarray(tokenizer.encode(full[len(before) :], add_special_tokens=False), np.int32)
    mask = np.concatenate([np.zeros(len(head), bool), np.ones(len(tail), bool)])
    mask[:1] = False
    return Example(np.concatenate([head, tail]), mask)


def encode_pair(where: str, tokenizer, row: dict) -> Pair:
    if isinstance(row["prompt"], str):
        sides = [
            encode_row(where, tokenizer, "completion", {"prompt": row["prompt"], "completion": row[s]}, False)
            for s in SIDES
        ]
    else:
        sides = [_encode_chat(where, tokenizer, row["prompt"], row[s]) for s in SIDES]
    return Pair(*sides)


def load_pairs(path: Path, tokenizer, max_seq_length: int, max_rows: int | None = None) -> list[Pair]:
    """Every row of `path` as a Pair. A row longer than --max-seq-length is an error, not a
    truncation: cutting one side's completion would change what the pair compares."""
    pairs, too_long, kind = [], [], None
    for number, row in read_rows(path)[:max_rows]:
        where = f"{path}:{number}"
        if row_format(where, row) != PREFERENCE:
            raise UserError(f"{where}: not a preference row; preference objectives need prompt, chosen and rejected")
        row_kind = "text" if isinstance(row["prompt"], str) else "conversational"
        if kind is None:
            kind = (row_kind, number)
        elif row_kind != kind[0]:
            raise UserError(f"{where}: {row_kind} row, but line {kind[1]} is {kind[0]}; use one format per file")
        pair = encode_pair(where, tokenizer, row)
        longest = max(len(pair.chosen.tokens), len(pair.rejected.tokens))
        if longest > max_seq_length:
            too_long.append((number, longest))
        if not (pair.chosen.mask.any() and pair.rejected.mask.any()):
            raise UserError(f"{where}: a completion has no tokens after tokenizing; write a longer one")
        pairs.append(pair)
    if too_long:
        number, longest = too_long[0]
        more = f" (and {len(too_long) - 1} more rows)" if len(too_long) > 1 else ""
        raise UserError(
            f"{path}:{number}: a side has {longest} tokens, more than --max-seq-length {max_seq_length}{more}; "
            "raise --max-seq-length or shorten the rows (preference pairs are never truncated)"
        )
    return pairs


def load_preference(data_dir: Path, tokenizer, max_seq_length: int, splits=("train", "valid")) -> dict[str, list]:
    return split_files(data_dir, lambda path: load_pairs(path, tokenizer, max_seq_length), splits)


def is_preference_file(path: Path) -> bool:
    """Whether the first row of `path` is a preference row (one format per file)."""
    _, row = read_rows(path)[0]
    return "chosen" in row or "rejected" in row


def collate_pairs(pairs: list[Pair], indices: list[int]) -> tuple[mx.array, mx.array]:
    """Tokens and loss mask (2B, L): rows 0..B-1 the chosen sides, B..2B-1 the rejected ones."""
    sides = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    return collate(sides, list(range(len(sides))))


def preference_split(source, split: str) -> Path | None:
    """The split's .jsonl file of a directory source when it holds preference rows, else None."""
    path = source.files.get(split) if isinstance(source, JsonlSource) else None
    return path if path is not None and is_preference_file(path) else None


def preference_dir(source, objective: str) -> Path:
    """Preference rows are read from a directory of train.jsonl and valid.jsonl."""
    if isinstance(source, JsonlSource) and "train" in source.files:
        return source.files["train"].parent
    raise UserError(
        f"--objective {objective} reads preference rows from a directory of train.jsonl and valid.jsonl; "
        f"--data {source.name} is not one (hub datasets and other file types are SFT-only for now)"
    )
