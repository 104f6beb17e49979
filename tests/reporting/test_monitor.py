"""Progress, metrics.jsonl, loss.png, plot and TensorBoard/wandb: what a training run reports."""

import io
import json
import math
import os
import pty
import re
import struct
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.reporting import progress
from mlx_lora.reporting.chart import BOTTOM, COLORS, HEIGHT, LEFT, RIGHT, TOP, WIDTH, Series, line_chart, sparkline
from mlx_lora.reporting.metrics import KEYS, METRICS, MetricsLog, read_metrics
from mlx_lora.reporting.plot import LOSS_PNG
from mlx_lora.training.loop import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a} + {b} = {a + b}. #### {a + b}"}
    for a in range(1, 7)
    for b in range(1, 5)
]


def _data(root: Path) -> Path:
    for split, rows in (("train", ROWS[:16]), ("valid", ROWS[16:])):
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data"


def _cfg(llama, root, **kw):
    return TrainConfig(
        model=str(llama),
        data=str(_data(root)),
        adapter_path=str(root / "run"),
        iters=4,
        batch_size=4,
        report_every=2,
        val_every=2,
        num_layers=2,
        rank=4,
        save_every=0,
        **kw,
    )


@pytest.fixture(scope="module")
def run(llama, tmp_path_factory):
    """A run with matplotlib unimportable: loss.png must not need it."""
    root = tmp_path_factory.mktemp("monitor")
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        result = train(_cfg(llama, root, report_to="tensorboard"), log=lines.append)
    return result, lines


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_metrics_jsonl_has_one_record_per_report_and_evaluation(run):
    result, _ = run
    records = read_metrics(result.adapter_path)
    assert all(tuple(r) == KEYS for r in records)
    assert [(r["step"], r["loss"] is not None, r["val_loss"] is not None) for r in records] == [
        (0, False, True),
        (2, True, False),
        (2, False, True),
        (4, True, False),
        (4, False, True),
    ]
    reports = [r for r in records if r["loss"] is not None]
    assert [r["loss"] for r in reports] == [sum(result.losses[0:2]) / 2, sum(result.losses[2:4]) / 2]
    assert {r["step"]: r["val_loss"] for r in records if r["val_loss"] is not None} == result.val_losses
    assert all(
        r["lr"] == pytest.approx(1e-3) and r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0 for r in reports
    )
    times = [r["time"] for r in records]
    assert times == sorted(times)


def test_loss_png_is_written_beside_the_adapter_without_matplotlib(run):
    from PIL import Image

    result, lines = run
    data = (result.adapter_path / LOSS_PNG).read_bytes()
    assert _png_size(data) == (WIDTH, HEIGHT)
    image = Image.open(io.BytesIO(data))
    image.load()  # decompresses every row: a bad CRC or a short IDAT raises here
    colours = {colour for _, colour in image.getcolors(WIDTH * HEIGHT)}
    assert COLORS[0] in colours  # the run's train and validation lines
    (summary,) = [l for l in lines if l.startswith("train loss ")]
    first, last = result.losses[0], result.losses[-1]
    assert f"{sparkline(result.losses)} {first:.3f} -> {last:.3f} over 4 steps" in summary
    assert len(sparkline(result.losses)) == 4


def test_sparkline_spans_the_blocks_and_averages_long_runs():
    assert sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert sparkline([2.0] * 3) == "▁▁▁" and sparkline([]) == "" and sparkline([2.0, math.nan, 1.0]) == "█▁"
    assert sparkline([float(i % 2) for i in range(80)]) == "▁" * 40  # pairs average to 0.5 each: flat
    # Ten buckets of ten: means 4.5 ... 94.5, at k/9 of the range -> levels round(7k/9) = 0 1 2 2 3 4 5 5 6 7.
    assert sparkline(list(range(100)), width=10) == "▁▂▃▃▄▅▆▆▇█"


def test_chart_puts_each_point_where_its_axes_say():
    from PIL import Image

    chart = line_chart([Series("train", [(0, 1.0), (10, 0.0)], 1)], "step", "loss")
    image = Image.open(io.BytesIO(chart)).convert("RGB")
    # Ticks 0..10 and 0..1 (round numbers at the data's ends): the line runs corner to corner of the plot area.
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = round(LEFT + t * (right - LEFT)), round(TOP + t * (bottom - TOP))
        near = {image.getpixel((x + dx, y + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
        assert COLORS[1] in near, (t, near)
    assert image.getpixel((LEFT + 5, bottom - 5)) == (255, 255, 255)  # off the line: background
    with_nan = line_chart([Series("train", [(0, 1.0), (5, math.nan), (10, 0.0)], 1)], "step", "loss")
    assert with_nan == chart  # a diverged step is left out, not drawn or fatal


def test_plain_lines_when_not_on_a_terminal(run):
    _, lines = run
    assert "step 2/4  val loss" in "\n".join(lines) and any(l.startswith("step 4/4  loss ") for l in lines)
    assert not any("\x1b" in l for l in lines)


def test_tensorboard_gets_the_same_scalars(run):
    from tensorboardX.proto.event_pb2 import Event

    result, _ = run
    (events,) = (result.adapter_path / "tensorboard").iterdir()
    data, scalars = events.read_bytes(), {}
    while data:  # TFRecord: length (8), crc (4), payload, crc (4)
        (length,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12 : 12 + length])
        data = data[16 + length :]
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    records = read_metrics(result.adapter_path)
    assert scalars[("val_loss", 4)] == pytest.approx(records[-1]["val_loss"])
    assert scalars[("loss", 2)] == pytest.approx(records[1]["loss"])
    assert {tag for tag, _ in scalars} == {"loss", "val_loss", "lr", "tokens_per_second", "peak_memory_gb"}


def test_report_to_a_missing_package_is_a_user_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for name in ("wandb", "tensorboard"):
        with pytest.raises(UserError, match=f"--report-to {name}: .* pip install"):
            MetricsLog(tmp_path, report_to=name)
    assert not (tmp_path / METRICS).exists()
    result = CliRunner().invoke(app, ["train", "--report-to", "tensorboard,mlflow"])
    assert result.exit_code == 2 and "--report-to: unknown mlflow; choose from tensorboard, wandb" in result.output


def test_wandb_receives_every_record(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(kw["project"]) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    metrics = MetricsLog(tmp_path, report_to="wandb")
    metrics.write(step=0, val_loss=2.5, time=0.1)
    metrics.write(step=3, loss=2.0, lr=1e-3, tokens_per_second=10.0, peak_memory_gb=0.5, time=0.2)
    metrics.close()
    assert calls == [
        "mlx-lora",
        (0, {"val_loss": 2.5, "time": 0.1}),
        (3, {"loss": 2.0, "lr": 1e-3, "tokens_per_second": 10.0, "peak_memory_gb": 0.5, "time": 0.2}),
        "finish",
    ]


def test_plot_draws_several_runs_on_one_chart(run, tmp_path):
    result, _ = run
    other = tmp_path / "other"
    other.mkdir()
    records = read_metrics(result.adapter_path)
    (other / METRICS).write_text(
        "".join(json.dumps({**r, "loss": r["loss"] and r["loss"] / 2}) + "\n" for r in records) + '{"step": 9, "lo'
    )
    runner = CliRunner()
    one = runner.invoke(app, ["plot", str(result.adapter_path), "--output", str(tmp_path / "one.png")])
    two = runner.invoke(app, ["plot", str(result.adapter_path), str(other), "--output", str(tmp_path / "two.png")])
    assert one.exit_code == two.exit_code == 0, two.output
    assert "loss curves of 2 runs written to" in two.output
    one_png, two_png = (tmp_path / "one.png").read_bytes(), (tmp_path / "two.png").read_bytes()
    _png_size(one_png), _png_size(two_png)
    assert one_png != two_png
    missing = runner.invoke(app, ["plot", str(tmp_path)])
    assert missing.exit_code == 2 and "no metrics.jsonl here" in missing.output


def _lines(screen: str) -> list[str]:
    """What a terminal shows: every redraw of the live line, without escape codes."""
    return [line for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).replace("\r", "\n").split("\n") if line]


def _on_a_terminal(args: list[str]) -> str:
    """What `args` writes to a pseudo-terminal (pty.spawn inherits the environment)."""
    chunks = []

    def read(fd):
        chunks.append(os.read(fd, 4096))
        return chunks[-1]

    pty.spawn(args, read)
    return b"".join(chunks).decode()


def test_bar_on_a_terminal_shows_step_stats_and_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150)
    bar = progress.Bar("training", 10, console=console)
    for step in range(1, 11):
        bar.advance(loss=2.0 / step, tokens_per_second=1234.0, peak_memory_gb=0.25)
    bar.advance(0, val_loss=0.75)
    bar.close()
    screen = out.getvalue()
    assert "10/10" in screen and "loss 0.200" in screen and "val 0.750" in screen
    assert "1234 tok/s" in screen and "peak 0.25 GB" in screen and "took 0:00:00" in screen
    assert not progress._shown


@pytest.mark.parametrize("width", [80, 200])
def test_one_line_that_fits_the_width_with_validation_as_a_field(width):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width)
    bar = progress.Bar("training", 300, console=console)
    bar.advance(15, loss=0.943, val_loss=1.11, tokens_per_second=2892.0, peak_memory_gb=0.04)
    validation = progress.Bar("validation", 25, console=console, transient=True)
    validation.advance(12)
    bar.progress.refresh()
    validation.close()
    bar.progress.refresh()
    bar.close()
    lines = _lines(out.getvalue())
    assert lines and all(len(line) <= width for line in lines) and "…" not in out.getvalue()
    assert all(line.startswith("training ━") for line in lines)  # one line; no second bar
    assert any("15/300 loss 0.943" in line and "validation 12/25" in line and "ETA" in line for line in lines)
    wide = "15/300 loss 0.943 · val 1.110 · 2892 tok/s · peak 0.04 GB · ETA"
    assert any(wide in line for line in lines) == (width == 200)


def test_fit_line_drops_the_least_useful_fields_first():
    fields = [(0, "15/300"), (1, "loss 0.943"), (4, "val 1.110"), (5, "2892 tok/s"), (1, "ETA 0:01:00")]
    assert progress.fit_line("training", fields, 200) == (
        "training",
        40,
        "15/300 loss 0.943 · val 1.110 · 2892 tok/s · ETA 0:01:00",
    )
    assert progress.fit_line("training", fields, 65) == ("training", 12, "15/300 loss 0.943 · val 1.110 · ETA 0:01:00")
    assert progress.fit_line("training", fields, 60) == ("training", 19, "15/300 loss 0.943 · ETA 0:01:00")
    assert progress.fit_line("training", fields, 20) == ("training 15/300", 0, "")


@pytest.mark.slow
def test_cli_draws_a_bar_on_a_terminal_and_plain_lines_otherwise(llama, tmp_path, monkeypatch):
    args = [
        sys.executable,
        "-m",
        "mlx_lora.cli",
        "train",
        "--model",
        str(llama),
        "--data",
        str(_data(tmp_path)),
        "--iters",
        "4",
        "--report-every",
        "2",
        "--num-layers",
        "2",
    ]
    # in-process: stdout is not a terminal
    piped = CliRunner().invoke(app, [*args[3:], "--adapter-path", str(tmp_path / "piped")]).stdout
    assert "step 4/4  loss" in piped and "\x1b" not in piped and "━" not in piped
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]))  # pty.spawn inherits the environment
    for width in (80, 200):
        monkeypatch.setenv("COLUMNS", str(width))
        screen = _on_a_terminal([*args, "--adapter-path", str(tmp_path / f"run{width}")])
        assert "step 4/4  loss" in screen and "━" in screen and "ETA" in screen and "…" not in screen
        bars = [line for line in _lines(screen) if "━" in line]  # the live line (plain lines hold paths)
        assert all(len(line) <= width for line in bars), [line for line in bars if len(line) > width]
        assert all(line.startswith("training ━") for line in bars)  # validation is a field, not a second bar
        assert any("4/4 loss" in line and "val" in line for line in bars)
