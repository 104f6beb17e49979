"""metrics.jsonl beside the adapter, and the same records sent to TensorBoard or wandb when asked.

One JSON object per training report or evaluation, every key always present (null when that
record does not carry it), so a run reads straight into pandas or `mlx-lora plot`.
"""

import json
from pathlib import Path
from typing import Any

from mlx_lora.config import split_list
from mlx_lora.errors import UserError

METRICS = "metrics.jsonl"
KEYS = ("step", "loss", "val_loss", "lr", "tokens_per_second", "peak_memory_gb", "time")
# Preference objectives add TRL's per-pair means (null in SFT runs): rewards, margins, accuracy, ORPO's log odds.
PREFERENCE_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "log_odds_ratio",
    "log_odds_chosen",
)
VAL_PREFERENCE_KEYS = ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_rewards/accuracies")
# GRPO adds its step's means (TRL's names where TRL has one; clip_ratio: TRL's clip_ratio/region_mean,
# skipped_groups: frac_reward_zero_std), and each reward's mean as rewards/<name>/mean (MetricsLog's `extra`).
GRPO_KEYS = (
    "reward",
    "reward_std",
    "kl",
    "clip_ratio",
    "completion_length",
    "skipped_groups",
    "rollout_seconds",
    "update_seconds",
    "val_reward",
)
KEYS = KEYS + PREFERENCE_KEYS + VAL_PREFERENCE_KEYS + GRPO_KEYS
TENSORBOARD_DIR = "tensorboard"


class TensorBoard:
    def __init__(self, out: Path, options: dict[str, Any]):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--report-to tensorboard: no TensorBoard writer installed; pip install tensorboardX "
                    "(or tensorboard with torch), or leave tensorboard out of --report-to"
                ) from None
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("step", "time") and value is not None:
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, options: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "--report-to wandb: wandb is not installed; pip install wandb, or leave wandb out of --report-to"
            ) from None
        self.run = wandb.init(project="mlx-lora", name=out.resolve().name, dir=str(out), config=options)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoard, "wandb": Wandb}


class MetricsLog:
    """Starts `out/metrics.jsonl` afresh (`append`: a resumed run continues it) and appends one
    flushed line per record; also to each of `report_to` (tensorboard, wandb), which wandb shows
    with the run's `options`. `extra`: this run's keys beyond KEYS (GRPO's per-reward means)."""

    def __init__(
        self,
        out: Path,
        report_to: str | None = None,
        append: bool = False,
        options: dict | None = None,
        extra: tuple[str, ...] = (),
    ):
        self.keys = KEYS + extra
        self.sinks = [SINKS[name](out, options or {}) for name in split_list(report_to)]  # fails before any file
        out.mkdir(parents=True, exist_ok=True)  # the run's first file: the directory is made only now
        self.file = open(out / METRICS, "a" if append else "w")  # noqa: SIM115  (open for the run; close())

    def write(self, **values: float | None) -> dict[str, Any]:
        record = {k: values.get(k) for k in self.keys}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.log(record)
        return record

    def close(self) -> None:
        self.file.close()
        for sink in self.sinks:
            sink.close()


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of a run directory; a torn last line (run killed mid-write) is skipped."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise UserError(f"{run}: no {METRICS} here; give the --adapter-path of a training run")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not valid JSON; fix or delete that line") from None
    return records
