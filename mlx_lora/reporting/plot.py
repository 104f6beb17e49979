"""Loss curves as a PNG: training and validation loss of one or several runs on one chart.

matplotlib is an optional extra (`pip install "mlx-lora[plot]"`); training works without it.
"""

import io
from pathlib import Path

from mlx_lora import atomic
from mlx_lora.config import PlotConfig
from mlx_lora.errors import UserError
from mlx_lora.reporting.metrics import read_metrics

LOSS_PNG = "loss.png"
INSTALL_HINT = 'pip install "mlx-lora[plot]" (matplotlib)'


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_runs(runs: list[Path], output: Path) -> Path:
    """Draw every run's train loss (solid) and validation loss (dashed, dots) in one colour per run."""
    if not have_matplotlib():
        raise UserError(f"plotting needs matplotlib: {INSTALL_HINT}")
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, run in enumerate(runs):
        records = read_metrics(run)
        label = Path(run).resolve().name if len(runs) == 1 else str(run)
        train = [(r["step"], r["loss"]) for r in records if r["loss"] is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r["val_loss"] is not None]
        if train:
            ax.plot(*zip(*train), "-", color=f"C{i}", label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(output, buffer.getvalue())
    return output


def plot(cfg: PlotConfig, log=print) -> Path:
    runs = [Path(r) for r in cfg.runs]
    default = runs[0] / LOSS_PNG if len(runs) == 1 else Path(LOSS_PNG)
    output = plot_runs(runs, Path(cfg.output) if cfg.output else default)
    log(f"loss curves of {len(runs)} run{'s' * (len(runs) > 1)} written to {output}")
    return output


def plot_after_training(out: Path, log=print) -> Path | None:
    """loss.png beside the adapter, or one line saying how to get it."""
    if not have_matplotlib():
        log(f"loss curve: {INSTALL_HINT} to get {out / LOSS_PNG}, or run `mlx-lora plot {out}` later")
        return None
    return plot_runs([out], out / LOSS_PNG)
