"""How an option is declared: a dataclass field with its default and help text, written once.

The CLI builds its flags from these fields, `--config run.yaml` fills them (files.py) and
adapter_config.json stores the LoRA part.
"""

import types
import typing
from dataclasses import field, fields
from typing import Any

# The panels `--help` groups a command's options into (typer's rich_help_panel).
MODEL, DATA, OPTIMISATION, METHODS, SAVING, DISTRIBUTED = (
    "Model and LoRA",
    "Data",
    "Optimisation",
    "Methods",
    "Saving and logging",
    "Distributed",
)
PANELS = (MODEL, DATA, OPTIMISATION, METHODS, SAVING, DISTRIBUTED)  # the order --help shows them in


def opt(default, help: str, off: str | None = None, panel: str | None = None):
    """An option; `off` names the flag that sets a boolean to False (default --no-<name>); `panel`
    is the --help group it is listed in (default: the command's one 'Options' panel)."""
    return field(default=default, metadata={"help": help, "off": off, "panel": panel})


def arg(help: str):
    """A required positional command-line argument (None until given)."""
    return field(default=None, metadata={"help": help, "positional": True})


def _unwrap(tp) -> type:
    """Optional[X] -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap(hints[f.name]) for f in fields(cls)}


def coerce(name: str, value: Any, tp: type) -> Any:
    """YAML reads `1e-4` as a string and users write lists where we take comma strings."""
    if value is None:
        return None
    if typing.get_origin(tp) is list:
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if tp is str and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if tp is str and isinstance(value, dict):  # rank_pattern / alpha_pattern as a YAML mapping
        return ",".join(f"{k}={v}" for k, v in value.items())
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if tp is int:
            if number != int(number):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return number
    return str(value)


def split_list(spec: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; None -> []."""
    return [s.strip() for s in str(spec or "").split(",") if s.strip()]
