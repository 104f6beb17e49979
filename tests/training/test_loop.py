"""The loop hands the rooms beneath training/ the few values they use, never the run's TrainConfig."""

import sys
from pathlib import Path

from mlx_lora.config import TrainConfig
from mlx_lora.training.loop import train

PACKAGE = Path(__file__).resolve().parents[2] / "mlx_lora"
BENEATH = tuple(str(PACKAGE / room) for room in ("data", "reporting", "distributed", "model", "formats"))


def test_no_room_beneath_training_receives_the_train_config(llama, tiny_data, tmp_path):
    """Every Python call into data/, reporting/, distributed/, model/ and formats/ during a run
    (with resume, early stopping and metrics), its arguments looked at as the call starts."""
    given = set()

    def watch(frame, event, _):
        if event == "call" and frame.f_code.co_filename.startswith(BENEATH):
            names = frame.f_code.co_varnames[: frame.f_code.co_argcount + frame.f_code.co_kwonlyargcount]
            if any(isinstance(frame.f_locals.get(n), TrainConfig) for n in names):
                given.add(f"{Path(frame.f_code.co_filename).relative_to(PACKAGE)}: {frame.f_code.co_name}")

    cfg = TrainConfig(
        model=str(llama),
        data=str(tiny_data),
        adapter_path=str(tmp_path / "run"),
        iters=2,
        batch_size=2,
        num_layers=1,
        rank=2,
        save_every=1,
        early_stopping_patience=3,
    )
    sys.setprofile(watch)
    try:
        train(cfg, log=lambda _: None)
        train(TrainConfig(**{**vars(cfg), "iters": 3, "resume": str(tmp_path / "run")}), log=lambda _: None)
    finally:
        sys.setprofile(None)
    assert not given, sorted(given)
