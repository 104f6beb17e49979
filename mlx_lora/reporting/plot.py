"""Loss curves as a PNG: training and validation loss of one or several runs on one chart.

Drawn by chart.py, which needs no package, so loss.png appears after a plain install.
"""

from pathlib import Path

from mlx_lora import atomic
from mlx_lora.config import PlotConfig
from mlx_lora.reporting.chart import Series, line_chart
from mlx_lora.reporting.metrics import read_metrics

LOSS_PNG = "loss.png"


def loss_series(runs: list[Path]) -> list[Series]:
    """Every run's train loss (solid) and validation loss (dashed, dots), one colour per run."""
    series = []
    for i, run in enumerate(runs):
        records = read_metrics(run)
        name = "" if len(runs) == 1 else f"{run} "
        train = [(r["step"], r["loss"]) for r in records if r["loss"] is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r["val_loss"] is not None]
        series += [Series(f"{name}train", train, i)] if train else []
        series += [Series(f"{name}validation", val, i, dashed=True)] if val else []
    return series


def plot_runs(runs: list[Path], output: Path) -> Path:
    atomic.write_bytes(output, line_chart(loss_series(runs), "step", "loss"))
    return output


def plot(cfg: PlotConfig, log=print) -> Path:
    runs = [Path(r) for r in cfg.runs]
    default = runs[0] / LOSS_PNG if len(runs) == 1 else Path(LOSS_PNG)
    output = plot_runs(runs, Path(cfg.output) if cfg.output else default)
    log(f"loss curves of {len(runs)} run{'s' * (len(runs) > 1)} written to {output}")
    return output
