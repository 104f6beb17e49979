"""Early stopping on validation loss (--early-stopping-patience): keep the best adapter."""

import math
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class EarlyStopping:
    patience: int  # validations in a row without a better loss before training stops
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict[str, mx.array] = field(default_factory=dict)
    waited: int = 0

    def observe(self, step: int, loss: float, weights: dict[str, mx.array]) -> None:
        """Record one validation. MLX arrays are immutable and each optimizer step makes new
        ones, so holding on to `weights` is a snapshot that costs no copy."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.best_weights, self.waited = loss, step, weights, 0
        else:
            self.waited += 1

    def counters(self) -> dict:
        """What a checkpoint keeps besides the best weights, so a resumed run judges like the first."""
        return {"best_loss": self.best_loss, "best_step": self.best_step, "waited": self.waited}

    @property
    def exhausted(self) -> bool:
        return self.waited >= self.patience
