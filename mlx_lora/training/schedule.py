"""The learning rate of every optimizer step: linear warmup, then constant, linear or cosine decay.

Built from mlx.optimizers schedules, which read the optimizer's own step counter, so the position
in the schedule is part of the optimizer state (saved and restored with it on resume).

Step u = 1..T (the optimizer's counter is u - 1). With W warmup steps, step u <= W uses
lr·u/W, so no step is wasted at zero; the decay then runs from lr at step W+1 to
lr·final_lr_ratio at step T.
"""

from collections.abc import Callable

import mlx.optimizers as optim

from mlx_lora.errors import UserError


def learning_rate(lr: float, schedule: str, warmup: int, final_ratio: float, steps: int) -> float | Callable:
    """A float when the rate never changes, else a schedule of the optimizer's step counter
    (--learning-rate, --lr-schedule, --warmup-steps, --final-lr-ratio over the run's steps)."""
    if warmup > steps:
        raise UserError(f"--warmup-steps {warmup} is more than the {steps} steps of this run; lower it")
    if schedule == "constant" and warmup <= 1:  # lr·u/W at u = W = 1 is lr itself
        return lr
    decay_steps = max(1, steps - warmup - 1)  # from the first step after warmup to the last
    final = lr * final_ratio
    decay = {
        "constant": optim.linear_schedule(lr, lr, 1),
        "linear": optim.linear_schedule(lr, final, decay_steps),
        "cosine": optim.cosine_decay(lr, decay_steps, final),
    }[schedule]
    if warmup <= 1:
        return decay
    ramp = optim.linear_schedule(lr / warmup, lr, warmup - 1)  # lr/W at the first step, lr at step W
    return optim.join_schedules([ramp, decay], [warmup])
