"""Rows -> tokens + loss mask.

A row's mask marks the tokens the loss counts: the completion or assistant turns (everything with
--train-on-prompt), never padding.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_lora.data.rows import PREFERENCE, read_rows, row_format
from mlx_lora.errors import UserError


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: token t is a training target (predicted from tokens < t)


def _chat_segments(where: str, tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces, via prefix renderings."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    segments, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= done):
            raise UserError(
                f"{where}: this tokenizer's chat template does not render turns as prefixes; use prompt/completion rows"
            )
        segments += [(before[done:], False), (upto[len(before) :], True)]
        done = len(upto)
    return segments + [(full[done:], False)]


def encode_row(where: str, tokenizer, fmt: str, row: dict, train_on_prompt: bool) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        parts = [(tokenizer.encode(row["text"]) + eos, True)]
    elif fmt == "completion":
        parts = [
            (tokenizer.encode(row["prompt"]), train_on_prompt),
            (tokenizer.encode(row["completion"], add_special_tokens=False) + eos, True),
        ]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"{where}: 'messages' rows need a tokenizer with a chat template; this one has none")
        parts = [
            (tokenizer.encode(text, add_special_tokens=False), is_reply or train_on_prompt)
            for text, is_reply in _chat_segments(where, tokenizer, row["messages"])
        ]
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in parts])
    mask = np.concatenate([np.full(len(ids), on, bool) for ids, on in parts])
    mask[:1] = False  # nothing predicts the first token
    return Example(tokens, mask)


def load_split(
    path: Path, tokenizer, max_seq_length: int, train_on_prompt: bool, log=print, max_rows: int | None = None
) -> list[Example]:
    rows = read_rows(path)[:max_rows]
    first_fmt, first_line = None, None
    examples, truncated, empty, shortest = [], 0, 0, None
    for number, row in rows:
        where = f"{path}:{number}"
        fmt = row_format(where, row)
        if fmt == PREFERENCE:
            raise UserError(
                f"{where}: a preference row (prompt, chosen, rejected); train on it with "
                "--objective dpo, ipo, orpo or simpo, or write prompt/completion rows for sft"
            )
        if first_fmt is None:
            first_fmt, first_line = fmt, number
        elif fmt != first_fmt:
            raise UserError(f"{where}: {fmt} row, but line {first_line} is a {first_fmt} row; use one format per file")
        ex = encode_row(where, tokenizer, fmt, row, train_on_prompt)
        if shortest is None or len(ex.tokens) < shortest[1]:
            shortest = (number, len(ex.tokens))
        if len(ex.tokens) > max_seq_length:
            truncated += 1
            ex = Example(ex.tokens[:max_seq_length], ex.mask[:max_seq_length])
        if ex.mask.any():
            examples.append(ex)
        else:
            empty += 1
    if truncated == len(rows):
        raise UserError(
            f"{path}:{shortest[0]}: every row is longer than --max-seq-length {max_seq_length} (this one, the "
            f"shortest, has {shortest[1]} tokens); raise --max-seq-length or shorten the rows"
        )
    if truncated:
        log(
            f"warning: {truncated} of {len(rows)} rows in {path} are longer than "
            f"--max-seq-length {max_seq_length} and were truncated"
        )
    if empty:
        log(f"warning: {empty} rows in {path} have no tokens to learn from (after truncation) and were skipped")
    if not examples:
        raise UserError(f"{path}: no row has a token to learn from within --max-seq-length {max_seq_length}; raise it")
    return examples


def load_dataset(
    data_dir: Path, tokenizer, max_seq_length: int, train_on_prompt: bool, splits=("train", "valid"), log=print
) -> dict[str, list[Example]]:
    out = {}
    for split in splits:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: missing; --data needs {' and '.join(s + '.jsonl' for s in splits)}")
        out[split] = load_split(path, tokenizer, max_seq_length, train_on_prompt, log)
    return out
