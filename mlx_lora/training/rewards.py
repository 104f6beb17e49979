"""Verifiable rewards for GRPO: what a completion of a prompt row scores.

Built in: `exact-match` (1 when the completion gives the reference's answer, as eval's exact match
reads it: the number after `####`, or the whole answer), `format` (1 when --format-regex is found
in the completion). `python:path/to/file.py:function` is a user's own, called as
function(prompt, completion, row) with row the data row's fields, returning a number. Several
rewards sum, each times its --reward-weights weight.
"""

import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.data.answers import agrees
from mlx_lora.data.rows import Row, row_format
from mlx_lora.errors import UserError

PYTHON = "python:"


@dataclass(frozen=True)
class Task:
    """A prompt row as rollouts see it: where it came from, its prompt, the reference answer, the row's fields."""

    where: str
    prompt: str
    reference: str
    fields: dict


@dataclass(frozen=True)
class Reward:
    name: str
    score: Callable[[Task, str], float]


def exact_match(task: Task, completion: str) -> float:
    return float(agrees(completion, task.reference))


def format_reward(pattern: re.Pattern) -> Callable[[Task, str], float]:
    return lambda task, completion: float(pattern.search(completion) is not None)


def python_reward(spec: str) -> Callable[[Task, str], float]:
    """`python:FILE:FUNCTION` loaded now, so a wrong path or name is refused before any rollout."""
    path, _, name = spec[len(PYTHON) :].rpartition(":")
    if not path or not name:
        raise UserError(f"--rewards {spec}: write python:path/to/file.py:function")
    if not Path(path).is_file():
        raise UserError(f"--rewards {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"mlx_lora_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--rewards {spec}: {path} failed to load: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--rewards {spec}: {path} has no function {name}")
    return lambda task, completion: fn(task.prompt, completion, task.fields)


def make_rewards(specs: list[str], format_regex: str) -> list[Reward]:
    """The rewards --rewards names, in order (config.TrainConfig checked the names and the regex)."""
    rewards = []
    for spec in specs:
        if spec == "exact-match":
            rewards.append(Reward(spec, exact_match))
        elif spec == "format":
            rewards.append(Reward(spec, format_reward(re.compile(format_regex))))
        else:
            rewards.append(Reward(spec, python_reward(spec)))
    return rewards


def score(reward: Reward, task: Task, completion: str) -> float:
    """The reward's value; whatever goes wrong in a user's function is one line naming the row."""
    try:
        value = reward.score(task, completion)
    except Exception as e:
        raise UserError(f"{task.where}: reward {reward.name} raised {type(e).__name__}: {e}") from None
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{task.where}: reward {reward.name} returned {value!r}; return a finite number")
    return float(value)


def task(row: Row, tokenizer) -> tuple[Task, list[int]]:
    """A prompt/completion row's prompt and reference (its completion), or a conversation's turns
    before its last assistant turn, rendered with the generation prompt, and that turn; with the
    prompt's tokens."""
    fmt = row_format(row.where, row.fields)
    if fmt == "completion":
        prompt, reference = row.fields["prompt"], row.fields["completion"]
        tokens = tokenizer.encode(prompt)
    elif fmt == "chat":
        messages = row.fields["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")  # row_format checked there is one
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        reference = messages[last]["content"]
        tokens = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        raise UserError(f"{row.where}: --objective grpo needs prompt/completion or messages rows, not {fmt} rows")
    if not tokens:
        raise UserError(f"{row.where}: the prompt is empty; give the row a prompt")
    return Task(row.where, prompt, reference, row.fields), tokens


def score_all(rewards: list[Reward], task: Task, completion: str) -> list[float]:
    """Each reward's value for one completion, in --rewards order."""
    return [score(r, task, completion) for r in rewards]
