"""JSONL rows on disk: where the data is, reading each line, and which of the three row formats it is.

Formats: text ({"text"}), completion ({"prompt", "completion"}), chat ({"messages"}) and
preference ({"prompt", "chosen", "rejected"}: strings, or a list of messages and lists of
assistant messages). Every problem names the file and line.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

from mlx_lora.errors import UserError

DEFAULT_DATA_DIRS = (
    Path(__file__).parent.parent / "default_data",  # installed wheel
    Path(__file__).parent.parent.parent / "data",  # source checkout
)
FORMAT_KEYS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant", "tool")
NEXT_ROLES = {None: ("user",), "system": ("user",), "user": ("assistant",), "assistant": ("user",)}
NEXT_ROLES |= {"call": ("tool",), "tool": ("tool", "assistant")}  # "call": an assistant turn with tool_calls
REASONING_KEYS = ("reasoning_content", "thinking")
PREFERENCE = "preference"
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
T = TypeVar("T")


class Row(NamedTuple):
    """One row of any source, with where it came from for every later error."""

    where: str  # "data/train.jsonl:12" or "openai/gsm8k [main] train row 12"
    number: int  # line in a file, row in a dataset split (1-based)
    fields: dict


def lines(path: Path) -> Iterator[str]:
    """The file's lines, read one at a time, without a leading byte-order mark; only "\n" ends a
    JSONL line (str.splitlines would also split at U+2028 inside a string)."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:  # a binary file splits at b"\n" alone
            try:
                line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
            offset += len(raw)
            yield line.removesuffix("\n")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; the first bad line is a UserError."""
    return list(iter_rows(path))


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """read_rows a line at a time, for sets larger than memory."""
    found = False
    for number, line in enumerate(lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); write one JSON object per line"
            ) from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply to read; flatten the row") from None
        if not isinstance(row, dict):
            raise UserError(
                f'{path}:{number}: expected a JSON object such as {{"text": ...}}, got {type(row).__name__}'
            )
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(
                f"{path}:{number}: contains an unpaired surrogate escape "
                f"({e.object[e.start : e.end]!a}); write valid Unicode"
            ) from None
        found = True
        yield number, row
    if not found:
        raise UserError(f"{path}: no rows; each line must be a JSON object with text, prompt+completion or messages")


def split_files(data_dir: Path, read: Callable[[Path], T], splits=("train", "valid")) -> dict[str, T]:
    """`read` over each <split>.jsonl of `data_dir`, every one of which must be there."""
    out = {}
    for split in splits:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: missing; --data needs {' and '.join(s + '.jsonl' for s in splits)}")
        out[split] = read(path)
    return out


def file_rows(path: Path) -> list[Row]:
    return list(iter_file_rows(path))


def iter_file_rows(path: Path) -> Iterator[Row]:
    return (Row(f"{path}:{n}", n, row) for n, row in iter_rows(path))


def row_format(where: str, row: dict) -> str:
    if "chosen" in row or "rejected" in row:
        check_preference(where, row)
        return PREFERENCE
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(k in row for k in keys)]
    if not found:
        raise UserError(
            f"{where}: row has none of the keys 'text', 'prompt'+'completion', 'messages' "
            f"(found: {', '.join(map(repr, row)) or 'no keys'}); map yours with --prompt-field and "
            "--completion-field, --text-field, --messages-field or --prompt-template and --completion-template"
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
        check_messages(where, row["messages"], row.get("tools"))
    return fmt


def check_messages(where: str, messages, tools=None) -> None:
    """System first if any, then user and assistant turns alternating; an assistant turn with
    tool_calls is answered by one or more tool turns before the next assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UserError(f"{where}: key 'tools' must be a list of function schemas (JSON objects)")
    for i, m in enumerate(messages):
        check_message(f"{where}: messages[{i}]", m)
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if i == 0 and role == "system":
            previous = role
            continue
        allowed = NEXT_ROLES["call" if previous == "assistant" and messages[i - 1].get("tool_calls") else previous]
        if role not in allowed:
            raise UserError(
                f"{where}: messages[{i}] has role '{role}' where {' or '.join(map(repr, allowed))} belongs; use an "
                "optional system turn, then user and assistant turns alternating (tool turns answer tool_calls)"
            )
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")


def check_message(where: str, m) -> None:
    """One message: a role, string content (an assistant's may be absent beside tool_calls), and
    an assistant's optional reasoning (reasoning_content or thinking) and tool_calls."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise UserError(f'{where} must be {{"role": one of {", ".join(ROLES)}, "content": string}}')
    calls = m.get("tool_calls")
    if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
        raise UserError(f'{where} must be {{"role": one of {", ".join(ROLES)}, "content": string}}')
    if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list) or not calls):
        raise UserError(f"{where}: 'tool_calls' must be a non-empty list, on an assistant turn")
    for call in calls or []:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f'{where}: each tool call must be {{"function": {{"name": string, "arguments": ...}}}}')
    for key in REASONING_KEYS:
        if m.get(key) is not None and (m["role"] != "assistant" or not isinstance(m[key], str)):
            raise UserError(f"{where}: '{key}' must be a string, on an assistant turn")


def check_preference(where: str, row: dict) -> None:
    """A {prompt, chosen, rejected} row: three strings, or a conversation (prompt: messages ending
    with a user turn; chosen, rejected: lists of assistant messages); the two sides must differ."""
    missing = [k for k in PREFERENCE_KEYS if k not in row]
    if missing:
        raise UserError(f"{where}: key '{missing[0]}' missing; a preference row needs prompt, chosen and rejected")
    if "completion" in row or "messages" in row or "text" in row:
        raise UserError(f"{where}: row mixes formats (preference and others); use prompt, chosen and rejected only")
    if isinstance(row["prompt"], str):
        for side in ("chosen", "rejected"):
            if not isinstance(row[side], str):
                raise UserError(f"{where}: '{side}' must be a string like the prompt, got {type(row[side]).__name__}")
            if not row[side].strip():
                raise UserError(f"{where}: '{side}' is empty; each side needs a completion to score")
    else:
        _check_conversation(where, row)
    if row["chosen"] == row["rejected"]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same; a pair must differ to teach a preference")


def _check_conversation(where: str, row: dict) -> None:
    if not isinstance(row["prompt"], list) or not row["prompt"]:
        raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")
    check_messages(f"{where}: prompt", [*row["prompt"], {"role": "assistant", "content": "-"}])
    if row["prompt"][-1]["role"] != "user":
        raise UserError(f"{where}: 'prompt' must end with a user turn, got '{row['prompt'][-1]['role']}'")
    for side in ("chosen", "rejected"):
        replies = row[side]
        ok = (
            isinstance(replies, list)
            and replies
            and all(
                isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
                for m in replies
            )
        )
        if not ok:
            raise UserError(
                f'{where}: \'{side}\' must be a non-empty list of {{"role": "assistant", "content": string}} '
                "when the prompt is a list of messages"
            )
        if not any(m["content"].strip() for m in replies):
            raise UserError(f"{where}: '{side}' is empty; each side needs a completion to score")
