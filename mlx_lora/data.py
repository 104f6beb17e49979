"""JSONL rows (text / prompt-completion / messages) -> tokens + loss mask -> padded batches.

A row's mask marks the tokens the loss counts: the completion or assistant turns (everything with
--train-on-prompt), never padding. Batches group rows of similar length so padding stays small.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .errors import UserError

SPLITS = ("train", "valid", "test")
DEFAULT_DATA_DIRS = (
    Path(__file__).parent / "default_data",  # installed wheel
    Path(__file__).parent.parent / "data",  # source checkout
)
FORMAT_KEYS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant")
PAD_MULTIPLE = 8  # fewer distinct batch shapes, so the compiled step is rebuilt less often


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: token t is a training target (predicted from tokens < t)


def resolve_data(data: Optional[str]) -> Path:
    if data is None:
        return next(d for d in DEFAULT_DATA_DIRS if (d / "train.jsonl").exists())
    path = Path(data).expanduser()
    if not path.is_dir():
        raise UserError(f"--data {data}: not a directory (expected one holding train.jsonl and valid.jsonl)")
    return path


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; the first bad line is a UserError."""
    rows = []
    try:
        # only "\n" ends a JSONL line (str.splitlines would also split at U+2028 inside a string)
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); write one JSON object per line") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply to read; flatten the row") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object such as {{\"text\": ...}}, got {type(row).__name__}")
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{path}:{number}: contains an unpaired surrogate escape ({e.object[e.start:e.end]!a}); write valid Unicode") from None
        rows.append((number, row))
    if not rows:
        raise UserError(f"{path}: no rows; each line must be a JSON object with text, prompt+completion or messages")
    return rows


def row_format(where: str, row: dict) -> str:
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(k in row for k in keys)]
    if not found:
        raise UserError(
            f"{where}: row has none of the keys 'text', 'prompt'+'completion', 'messages' "
            f"(found: {', '.join(map(repr, row)) or 'no keys'})"
        )
    if len(found) > 1:
        raise UserError(f"{where}: row mixes formats ({' and '.join(found)}); use one of them per row")
    fmt = found[0]
    for key in FORMAT_KEYS[fmt]:
        if key not in row:
            raise UserError(f"{where}: key '{key}' missing; a {fmt} row needs {' and '.join(FORMAT_KEYS[fmt])}")
        if fmt != "chat" and not isinstance(row[key], str):
            raise UserError(f"{where}: key '{key}' must be a string, got {type(row[key]).__name__}")
    if fmt == "chat":
        check_messages(where, row["messages"])
    return fmt


def check_messages(where: str, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(
                f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": string}}"
            )
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected:
        bad = next(i for i, (r, e) in enumerate(zip(turns, expected)) if r != e) + len(roles) - len(turns)
        raise UserError(
            f"{where}: messages[{bad}] has role '{roles[bad]}' where '{expected[bad - len(roles) + len(turns)]}' "
            "belongs; use an optional system turn, then user and assistant turns alternating"
        )
    if "assistant" not in turns:
        raise UserError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")


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
            raise UserError(f"{where}: this tokenizer's chat template does not render turns as prefixes; use prompt/completion rows")
        segments += [(before[done:], False), (upto[len(before):], True)]
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


def load_split(path: Path, tokenizer, max_seq_length: int, train_on_prompt: bool, log=print,
               max_rows: Optional[int] = None) -> list[Example]:
    rows = read_rows(path)[:max_rows]
    first_fmt, first_line = None, None
    examples, truncated, empty, shortest = [], 0, 0, None
    for number, row in rows:
        where = f"{path}:{number}"
        fmt = row_format(where, row)
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
        log(f"warning: {truncated} of {len(rows)} rows in {path} are longer than --max-seq-length {max_seq_length} and were truncated")
    if empty:
        log(f"warning: {empty} rows in {path} have no tokens to learn from (after truncation) and were skipped")
    if not examples:
        raise UserError(
            f"{path}: no row has a token to learn from within --max-seq-length {max_seq_length}; raise it"
        )
    return examples


def load_dataset(data_dir: Path, tokenizer, max_seq_length: int, train_on_prompt: bool,
                 splits=("train", "valid"), log=print) -> dict[str, list[Example]]:
    out = {}
    for split in splits:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: missing; --data needs {' and '.join(s + '.jsonl' for s in splits)}")
        out[split] = load_split(path, tokenizer, max_seq_length, train_on_prompt, log)
    return out


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: rows shuffled, sorted by length within windows, batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].tokens))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], indices: list[int]) -> tuple[mx.array, mx.array]:
    """Right-padded tokens (B, L) and loss mask (B, L); padding is never a target."""
    longest = max(len(examples[i].tokens) for i in indices)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(indices), length), np.int32)
    mask = np.zeros((len(indices), length), bool)
    for row, i in enumerate(indices):
        ex = examples[i]
        tokens[row, : len(ex.tokens)] = ex.tokens
        mask[row, : len(ex.mask)] = ex.mask
    return mx.array(tokens), mx.array(mask)


def epoch_packs(examples: list[Example], batch_size: int, length: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch of packed batches (--pack): shuffled rows laid end to end into sequences of at
    most `length` tokens (next fit), `batch_size` sequences per batch."""
    rng = np.random.default_rng([seed, epoch])
    packs, used = [[]], 0
    for i in rng.permutation(len(examples)):
        n = len(examples[i].tokens)
        if used + n > length and packs[-1]:
            packs, used = packs + [[]], 0
        packs[-1].append(int(i))
        used += n
    return [packs[j : j + batch_size] for j in range(0, len(packs), batch_size)]


def collate_packs(examples: list[Example], packs: list[list[int]]) -> tuple[mx.array, mx.array, mx.array]:
    """Tokens, loss mask and segments (B, L): a token's segment is the index of its row within
    the sequence; padding is one more segment. A row's first token is never a target, so no
    loss crosses from one row into the next."""
    rows = [[examples[i] for i in pack] for pack in packs]
    longest = max(sum(len(ex.tokens) for ex in pack) for pack in rows)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(packs), length), np.int32)
    mask = np.zeros((len(packs), length), bool)
    segments = np.zeros((len(packs), length), np.int32)
    for b, pack in enumerate(rows):
        ends = np.cumsum([len(ex.tokens) for ex in pack])
        tokens[b, : ends[-1]] = np.concatenate([ex.tokens for ex in pack])
        mask[b, : ends[-1]] = np.concatenate([ex.mask for ex in pack])
        segments[b] = np.searchsorted(ends, np.arange(length), side="right")  # padding: len(pack)
    return mx.array(tokens), mx.array(mask), mx.array(segments)


def iterate_batches(examples: list[Example], batch_size: int, seed: int, start: int = 0,
                    pack_length: Optional[int] = None,
                    shard: Optional[Callable[[list], list]] = None) -> Iterator[tuple[list, tuple, int]]:
    """Endless (rows, batch, real token count): `batch` is (tokens, mask) collated from
    `examples[rows]`, or (tokens, mask, segments) packed ones with `pack_length` (rows are then
    packs of row indices); `start` skips that many batches, so a resumed run sees the same order
    as an uninterrupted one. In a group, `shard` picks this process's rows or packs
    (distributed.World.shard) and the count stays the whole batch's; a process left without any
    gets one with nothing to learn, so it still joins the gradient sum."""
    step, epoch = 0, 0
    while True:
        if pack_length is None:
            plan, collated = epoch_batches(examples, batch_size, seed, epoch), collate
        else:
            plan, collated = epoch_packs(examples, batch_size, pack_length, seed, epoch), collate_packs
        for batch in plan:
            if step >= start:
                rows = [i for pack in batch for i in pack] if pack_length else batch
                mine = shard(batch) if shard else batch
                tokens, mask, *segments = collated(examples, mine or batch[:1])
                learned = mask if mine else mx.zeros_like(mask)
                yield mine or batch[:1], (tokens, learned, *segments), sum(len(examples[i].tokens) for i in rows)
            step += 1
        epoch += 1


def batches_per_epoch(examples: list[Example], batch_size: int, pack_length: Optional[int] = None) -> int:
    if pack_length is not None:
        return len(epoch_packs(examples, batch_size, pack_length, seed=0, epoch=0))
    return -(-len(examples) // batch_size)
