"""Everything a training run reports, behind three calls from the loop: step, report, validation.

Each report or evaluation is one plain `log` line (what CI and log files see), one record in
metrics.jsonl (and TensorBoard / wandb when asked), and fresh numbers on the live bar when on a
terminal. At the end the loss curve goes to loss.png beside the adapter, and a sparkline of it to
the log.
"""

import time
from pathlib import Path

from mlx_lora.reporting.chart import sparkline
from mlx_lora.reporting.metrics import VAL_PREFERENCE_KEYS, MetricsLog
from mlx_lora.reporting.plot import LOSS_PNG, plot_runs
from mlx_lora.reporting.progress import Bar


def preference_line(stats: dict[str, float]) -> str:
    """'  acc 0.75  margin 0.123  chosen 0.050  rejected -0.073' (and ORPO's log odds), or '' for SFT."""
    if not stats:
        return ""
    line = (
        f"  acc {stats['rewards/accuracies']:.2f}  margin {stats['rewards/margins']:.3f}  "
        f"chosen {stats['rewards/chosen']:.3f}  rejected {stats['rewards/rejected']:.3f}"
    )
    return line + (f"  log odds {stats['log_odds_chosen']:.3f}" if "log_odds_chosen" in stats else "")


class TrainMonitor:
    def __init__(self, out: Path, total: int, metrics: MetricsLog, log=print):
        """`total` steps; `metrics` opened on `out`, where loss.png goes at the end."""
        self.out, self.total, self.log = Path(out), total, log
        self.metrics = metrics
        self.bar = Bar("training", total, log)
        self.start = time.perf_counter()
        self.losses: list[float] = []  # every step's, for the sparkline

    def _record(self, **values) -> None:
        self.metrics.write(**values, time=round(time.perf_counter() - self.start, 3))

    def step(self, loss: float) -> None:
        """Called once per optimizer step: moves the bar."""
        self.losses.append(loss)
        self.bar.advance(loss=loss)

    def report(
        self, step: int, loss: float, tokens_per_second: float, peak_memory_gb: float, lr: float, **stats: float
    ) -> None:
        """Mean training loss over the last report window, throughput and memory; a preference
        objective's rewards (`rewards/chosen`, `rewards/rejected`, ...) when given."""
        if stats:
            stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
        self.log(
            f"step {step}/{self.total}  loss {loss:.3f}{preference_line(stats)}  {tokens_per_second:.0f} tok/s  "
            f"peak mem {peak_memory_gb:.2f} GB"
        )
        self._record(
            step=step, loss=loss, lr=lr, tokens_per_second=tokens_per_second, peak_memory_gb=peak_memory_gb, **stats
        )
        self.bar.advance(0, loss=loss, tokens_per_second=tokens_per_second, peak_memory_gb=peak_memory_gb)

    def validation(self, step: int, val_loss: float, **stats: float) -> None:
        """The validation loss; a preference objective's rewards on the valid pairs when given."""
        if stats:
            stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
        self.log(f"step {step}/{self.total}  val loss {val_loss:.3f}{preference_line(stats)}")
        val = {f"val_{k}": v for k, v in stats.items() if f"val_{k}" in VAL_PREFERENCE_KEYS}
        self._record(step=step, val_loss=val_loss, **val)
        self.bar.advance(0, val_loss=val_loss)

    def rollout_report(self, step: int, loss: float, peak_memory_gb: float, lr: float, **stats: float) -> None:
        """A GRPO report: mean loss, rewards, kl, clip ratio, completion length, skipped groups and
        where the time went, over the steps since the last (metrics.GRPO_KEYS and rewards/<name>/mean)."""
        self.log(
            f"step {step}/{self.total}  loss {loss:.3f}  reward {stats['reward']:.3f} (std {stats['reward_std']:.3f})  "
            f"kl {stats['kl']:.4f}  clip {stats['clip_ratio']:.3f}  length {stats['completion_length']:.1f}  "
            f"skipped {100 * stats['skipped_groups']:.0f}%  rollout {stats['rollout_seconds']:.1f}s  "
            f"update {stats['update_seconds']:.1f}s  peak mem {peak_memory_gb:.2f} GB"
        )
        self._record(step=step, loss=loss, lr=lr, peak_memory_gb=peak_memory_gb, **stats)
        self.bar.advance(0, loss=loss, peak_memory_gb=peak_memory_gb)

    def reward_validation(self, step: int, reward: float, **means: float) -> None:
        """A GRPO validation: the mean reward of rollouts on the valid prompts, and each reward's mean."""
        self.log(f"step {step}/{self.total}  val reward {reward:.3f}")
        self._record(step=step, val_reward=reward, **{f"val_{k}": v for k, v in means.items()})

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        plot_runs([self.out], self.out / LOSS_PNG)
        if self.losses:
            self.log(
                f"train loss {sparkline(self.losses)} {self.losses[0]:.3f} -> {self.losses[-1]:.3f} "
                f"over {len(self.losses)} steps; the curve is in {self.out / LOSS_PNG}"
            )
