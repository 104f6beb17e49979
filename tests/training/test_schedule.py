import math

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_map

from mlx_lora.config import TrainConfig, build_config
from mlx_lora.errors import UserError
from mlx_lora.training import schedule as schedules

LR, STEPS = 0.1, 10


def rates(schedule, steps=STEPS, optimizer=None):
    """The learning rate each of `steps` AdamW updates used, read back from the optimizer state."""
    optimizer = optimizer or optim.AdamW(learning_rate=schedule)
    params = {"w": mx.zeros(3)}
    used = []
    for _ in range(steps):
        params = optimizer.apply_gradients({"w": mx.ones(3)}, params)
        used.append(optimizer.learning_rate.item())
    return used


def cfg(**kw):
    return build_config(TrainConfig, {}, {"learning_rate": LR, **kw})


def learning_rate(c: TrainConfig, steps: int):
    """The schedule `mlx-lora train` builds from these options."""
    return schedules.learning_rate(c.learning_rate, c.lr_schedule, c.warmup_steps, c.final_lr_ratio, steps)


def test_constant_without_warmup_is_a_plain_rate():
    assert learning_rate(cfg(), STEPS) == LR


def test_warmup_ramps_from_lr_over_w_then_holds():
    assert rates(learning_rate(cfg(warmup_steps=4), STEPS)) == pytest.approx(
        [LR * u / 4 for u in (1, 2, 3, 4)] + [LR] * 6
    )


def test_linear_decay_runs_from_lr_after_warmup_to_the_final_rate_at_the_last_step():
    expected = [LR * u / 3 for u in (1, 2, 3)] + [LR - (LR - LR * 0.1) * d / 6 for d in range(7)]
    assert rates(learning_rate(cfg(lr_schedule="linear", warmup_steps=3), STEPS)) == pytest.approx(expected)


def test_cosine_decay_without_warmup():
    final = LR * 0.2
    expected = [final + (LR - final) * 0.5 * (1 + math.cos(math.pi * d / 9)) for d in range(10)]
    used = rates(learning_rate(cfg(lr_schedule="cosine", final_lr_ratio=0.2), STEPS))
    assert used == pytest.approx(expected, rel=1e-6)
    assert used[0] == pytest.approx(LR) and used[-1] == pytest.approx(final)


def test_schedule_position_lives_in_the_optimizer_state():
    """A fresh optimizer given a saved state continues the sequence: resume needs nothing else."""
    schedule = learning_rate(cfg(lr_schedule="cosine", warmup_steps=2), STEPS)
    first = optim.AdamW(learning_rate=schedule)
    head = rates(schedule, 4, first)
    resumed = optim.AdamW(learning_rate=schedule)
    resumed.state = tree_map(lambda x: x, first.state)
    assert head + rates(schedule, 6, resumed) == pytest.approx(rates(schedule))


def test_bad_schedule_options_are_user_errors():
    with pytest.raises(UserError) as e:
        cfg(lr_schedule="exp", warmup_steps=-1, final_lr_ratio=2.0)
    assert all(
        f in str(e.value)
        for f in ("--lr-schedule must be one of constant, linear, cosine", "--warmup-steps", "--final-lr-ratio")
    )
    with pytest.raises(UserError, match="--warmup-steps 11 is more than the 10 steps"):
        learning_rate(cfg(warmup_steps=11), STEPS)
