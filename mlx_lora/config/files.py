"""YAML files and the command line onto a config dataclass: defaults < YAML < flags, then validated."""

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mlx_lora.config.fields import coerce, field_types
from mlx_lora.config.train import TrainConfig
from mlx_lora.errors import UserError


def load_yaml(path: Path, cls=TrainConfig) -> dict[str, Any]:
    """Read a YAML options file, naming file, line and key for every problem at once."""
    try:
        root = yaml.compose(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:1: expected 'key: value' lines at the top level")
    types_ = field_types(cls)
    values, problems = {}, []
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        name = key.replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, types_, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}:{line}: unknown key '{key}'{hint}")
            continue
        try:
            raw = yaml.safe_load(yaml.serialize(value_node))
            values[name] = coerce(name, raw, types_[name])
        except ValueError as e:
            problems.append(f"{path}:{line}: {e}")
    if values.get("iters") is not None and values.get("epochs") is not None:
        problems.append(f"{path}: both iters and epochs are set; training length is one or the other, keep one")
    if problems:
        raise UserError("\n".join(problems))
    return values


def build_config(cls, file_values: dict[str, Any], cli_values: dict[str, Any]):
    """Defaults < YAML < command line; then validate the result."""
    given = {k: v for k, v in cli_values.items() if v is not None and v != []}
    merged = {**file_values, **given}
    if "iters" in given and "epochs" in given:
        raise UserError("--iters and --epochs both given: training length is one or the other; keep one")
    if "iters" in given:
        merged["epochs"] = None  # --iters on the command line beats epochs from a file or a resumed run
    cfg = replace(cls(), **merged)
    problems = cfg.problems()
    if problems:
        raise UserError("\n".join(problems))
    return cfg
