"""Any schema -> one of the three row formats: columns named by flags, or templates over a row's columns.

`--prompt-field question --completion-field answer`, `--text-field body`, `--messages-field
conversations` (role/content or ShareGPT from/value turns) or `--prompt-template 'Q: {question}\\nA:'
--completion-template ' {answer}'`. Without any of them rows pass through unchanged.
"""

import re
import string
from collections.abc import Iterable, Iterator

from mlx_lora.config.data import DataConfig
from mlx_lora.data.rows import Row
from mlx_lora.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ESCAPE = re.compile(r"\\(n|t|\\)")


def unescape(template: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line become a newline, a tab and a backslash."""
    return _ESCAPE.sub(lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], template)


def template_fields(template: str) -> list[str]:
    """The column names a template reads: 'Q: {question}' -> ['question']."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UserError(f"template {template!r}: {e}; write {{{{ and }}}} for literal braces") from None


def mapped_columns(cfg: DataConfig) -> list[tuple[str, str]]:
    """(flag, column) for every column the mapping reads, to check against a source's columns at once."""
    named = [
        (f"--{name.replace('_', '-')} {column}", column)
        for name in ("text_field", "prompt_field", "completion_field", "messages_field")
        if (column := getattr(cfg, name))
    ]
    for name in ("prompt_template", "completion_template"):
        template = getattr(cfg, name)
        if template:
            named += [(f"--{name.replace('_', '-')} {{{f}}}", f) for f in template_fields(unescape(template))]
    return named


def _column(where: str, row: dict, flag: str, column: str):
    if column not in row:
        raise UserError(f"{where}: {flag}: the row has no column '{column}' (it has: {', '.join(row) or 'none'})")
    value = row[column]
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _fill(where: str, row: dict, flag: str, template: str) -> str:
    for name in template_fields(template):
        if name not in row:
            raise UserError(
                f"{where}: {flag} reads {{{name}}}, which this row lacks (it has: {', '.join(row) or 'none'})"
            )
    try:
        return template.format_map(row)
    except (IndexError, KeyError, AttributeError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {flag} {template!r} cannot be filled from this row ({e})") from None


def _turns(where: str, turns) -> list:
    """ShareGPT {from, value} turns as {role, content}; role/content turns unchanged."""
    if not isinstance(turns, list):
        return turns  # row_format reports the shape
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "from" in t and "role" not in t:
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise UserError(
                    f"{where}: turn {i} is from '{t['from']}'; ShareGPT turns are from "
                    f"{', '.join(sorted(SHAREGPT_ROLES))}"
                )
            t = {"role": role, "content": t.get("value")}
        elif isinstance(t, dict):
            t = {"role": t.get("role"), "content": t.get("content")}  # drop extras such as 'name' or 'weight'
        out.append(t)
    return out


def _side(where: str, row: dict, cfg: DataConfig, side: str) -> str:
    column, template = getattr(cfg, f"{side}_field"), getattr(cfg, f"{side}_template")
    if column:
        return _column(where, row, f"--{side}-field", column)
    return _fill(where, row, f"--{side}-template", unescape(template))


def map_row(where: str, row: dict, cfg: DataConfig) -> dict:
    """`row` in the text, prompt+completion or messages format, as `cfg` maps it."""
    if cfg.text_field:
        return {"text": _column(where, row, "--text-field", cfg.text_field)}
    if cfg.messages_field:
        return {"messages": _turns(where, _column(where, row, "--messages-field", cfg.messages_field))}
    if cfg.prompt_field or cfg.prompt_template:
        return {"prompt": _side(where, row, cfg, "prompt"), "completion": _side(where, row, cfg, "completion")}
    return row


def map_rows(rows: list[Row], cfg: DataConfig) -> list[Row]:
    """Every row in a row format (unchanged when no mapping flag is set)."""
    return list(iter_mapped(rows, cfg)) if cfg.mapped else rows


def iter_mapped(rows: Iterable[Row], cfg: DataConfig) -> Iterator[Row]:
    """map_rows a row at a time."""
    return (Row(r.where, r.number, map_row(r.where, r.fields, cfg)) if cfg.mapped else r for r in rows)
