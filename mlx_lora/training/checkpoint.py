"""Checkpoints: everything a run needs to continue exactly where it stopped.

`<adapter-path>/checkpoints/step-NNNNNNN/` is a complete adapter directory (adapters.safetensors +
adapter_config.json) plus the optimizer state and the loop's named state. It is written to a
temporary directory and renamed (atomic.replace_dir), so after a kill -9 it is whole or absent.
"""

import json
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_lora import atomic
from mlx_lora.atomic import replace_dir
from mlx_lora.config import LoRAConfig, TrainConfig, lora_part
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, AdapterConfig, read_weights, save_adapter
from mlx_lora.model.base import Base

TRAIN = "mlx-lora train"  # the writer an adapter directory's atomic.OWNER names
CHECKPOINTS = "checkpoints"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
BEST_WEIGHTS = "best.safetensors"  # with early stopping: the adapter of the best validation so far
STATE_VERSION = 1
# Not restored: the optimizer built from the (possibly changed) options sets it, and a schedule
# recomputes it from the restored step before every update.
NOT_RESTORED = ("learning_rate",)


@dataclass
class TrainerState:
    """The loop's named state. A new field needs a default so older checkpoints still load."""

    step: int  # optimizer steps done
    batches_seen: int  # position in the data order: iterate_batches(start=batches_seen)
    rng_key: list[int]  # mx.random.state[0], the key dropout draws from
    config: dict[str, Any] = field(default_factory=dict)  # the run's TrainConfig, so --resume alone restores it
    early_stopping: dict[str, Any] = field(default_factory=dict)  # EarlyStopping's counters; weights in BEST_WEIGHTS

    def to_json(self) -> dict[str, Any]:
        return {"format_version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, path: Path, data: Any) -> "TrainerState":
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or any(k not in data for k in ("step", "batches_seen", "rng_key")):
            raise UserError(f"{path}: not an mlx-lora trainer state (needs step, batches_seen, rng_key)")
        if data.get("format_version", 1) > STATE_VERSION:
            raise UserError(f"{path}: format_version {data['format_version']} is newer than this mlx-lora; upgrade it")
        return cls(**{k: data[k] for k in names if k in data})


def checkpoint_dir(adapter_path: Path, step: int) -> Path:
    return Path(adapter_path) / CHECKPOINTS / f"step-{step:07d}"


def resume_command(checkpoint: Path) -> str:
    return f"mlx-lora train --resume {shlex.quote(str(checkpoint))}"


def rng_key() -> list[int]:
    return mx.random.state[0].tolist()


def restore_rng(key: list[int]) -> None:
    """mx.random.seed(s) sets the key to [s >> 32, s & 0xffffffff], so any key can be put back."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    adapter: AdapterConfig,
    optimizer: optim.Optimizer,
    state: TrainerState,
    best_weights: dict[str, mx.array] | None = None,
) -> None:
    with replace_dir(directory, TRAIN, "--adapter-path") as tmp:
        save_adapter(tmp, model, adapter)
        atomic.save_safetensors(tmp / OPTIMIZER_STATE, dict(tree_flatten(optimizer.state)))
        if best_weights:
            atomic.save_safetensors(tmp / BEST_WEIGHTS, best_weights)
        atomic.write_json(tmp / TRAINER_STATE, state.to_json())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the one written last under an adapter directory (last
    written, not highest step: a newer run in the same directory may not have caught up yet)."""
    path = Path(path).expanduser()
    if (path / TRAINER_STATE).is_file():
        return path
    found = sorted(
        (p for p in (path / CHECKPOINTS).glob("step-*") if (p / TRAINER_STATE).is_file()),
        key=lambda p: ((p / TRAINER_STATE).stat().st_mtime_ns, p.name),
    )
    if not found:
        raise UserError(
            f"--resume {path}: no checkpoint there (expected {TRAINER_STATE}, or {CHECKPOINTS}/step-* under an "
            "adapter directory); train with --save-every N to write them"
        )
    return found[-1]


def read_best(checkpoint: Path) -> dict[str, mx.array]:
    return read_weights(checkpoint / BEST_WEIGHTS)[0] if (checkpoint / BEST_WEIGHTS).is_file() else {}


def read_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / TRAINER_STATE
    try:
        return TrainerState.from_json(path, json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); resume from another checkpoint") from None


def saved_options(resume: str) -> dict[str, Any]:
    """The options the checkpointed run used, as a layer under YAML and flags (CLI precedence).

    Its adapter path is the directory holding checkpoints/, wherever that has moved since. A run
    started with --init-adapter continues from the checkpoint's weights, not that adapter's."""
    checkpoint = find_checkpoint(resume)
    known = {f.name for f in fields(TrainConfig)} - {"init_adapter"}
    options = {k: v for k, v in read_state(checkpoint).config.items() if k in known}
    return {**options, "adapter_path": str(checkpoint.parent.parent), "resume": str(checkpoint)}


def load_checkpoint(
    checkpoint: Path, base: Base, cfg: LoRAConfig, optimizer: optim.Optimizer
) -> tuple[TrainerState, AdapterConfig]:
    """Wrap and load the adapter (base fingerprint and shapes checked), then put the optimizer
    state and RNG key back."""
    state = read_state(checkpoint)
    adapter = load_adapter(base, checkpoint)
    differ = [k for k, v in lora_part(cfg).items() if v != getattr(adapter.lora, k)]
    if differ:
        k = differ[0]
        raise UserError(
            f"{checkpoint / ADAPTER_CONFIG}: {k} is {getattr(adapter.lora, k)!r} but this run asks for "
            f"{getattr(cfg, k)!r}; drop --{k.replace('_', '-')} to resume, or start a new run"
        )
    optimizer.init(base.model.trainable_parameters())
    saved, _ = read_weights(checkpoint / OPTIMIZER_STATE)
    expected = {k: v for k, v in tree_flatten(optimizer.state) if k not in NOT_RESTORED}
    wrong = [k for k in expected if k not in saved or saved[k].shape != expected[k].shape]
    wrong += [k for k in saved if k not in expected and k not in NOT_RESTORED]
    if wrong:
        raise UserError(
            f"{checkpoint / OPTIMIZER_STATE}: does not fit the adapter ({wrong[0]}); resume from another checkpoint"
        )
    for key in expected:
        _set_leaf(optimizer.state, key, saved[key])
    restore_rng(state.rng_key)
    return state, adapter


def _set_leaf(tree, path: str, value: mx.array) -> None:
    """Assign in place, so a compiled step that captured this tree sees the new arrays."""
    *parents, last = path.split(".")
    for key in parents:
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value
