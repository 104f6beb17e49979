"""Per-step cost of each lever of `mlx-lora train`, in one process, on the same batches, alternating.

    python bench/train_speed.py --work /tmp/bench ...   # builds model-smol/ and data-16/ there
    python bench/levers.py /tmp/bench/model-smol /tmp/bench/data-16

Steps: the full-logit loss through the whole model (the plain path), the loss on target positions
only (head cut), and that from cached frozen-block states (later epochs); plus the frozen-block
forward that the first epoch pays on top of the cached step.
"""

import statistics
import sys
import time
from pathlib import Path

import mlx_lora  # noqa: F401  (OpenBLAS, which must come before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_lora.config import TrainConfig
from mlx_lora.data.batches import collate, epoch_batches
from mlx_lora.data.examples import load_dataset
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import apply_lora
from mlx_lora.training.feed import Feed, make_feed

LAST = 4


def compiled_step(model, feed):
    optimizer = optim.AdamW(learning_rate=0.0)  # lr 0: every variant sees the same weights
    loss_and_grad = nn.value_and_grad(model, feed.loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(*inputs):
        (loss, _), grads = loss_and_grad(model, *inputs)
        optimizer.update(model, grads)
        return loss

    return mx.compile(step, inputs=state, outputs=state), state


def main(model_dir: str, data_dir: str, reps: int = 3) -> None:
    base = load_base(model_dir)
    use_cpu_kernels(base.model)  # as train runs it
    examples = load_dataset(Path(data_dir), base.tokenizer, 256, False)["train"]
    apply_lora(base.model, TrainConfig(num_layers=LAST))
    model, first = base.model, len(base.model.layers) - LAST
    cached = make_feed(model, first, examples, True, log=lambda s: None)
    feeds = {
        "full logits, whole model": Feed(None, False),
        "target-only head": Feed(cached.cut, False),
        "target-only head + cached prefix": cached,
    }
    steps = {name: compiled_step(model, feed) for name, feed in feeds.items()}
    batches = epoch_batches(examples, 4, 0, 0)
    for b in batches:
        cached.inputs(examples, b)  # fill the cache; its cost is timed as the prefix forward below
    times = {name: [] for name in [*feeds, "frozen-prefix forward (epoch 1 only)"]}
    for _ in range(reps):  # the first round compiles and is not counted
        for b in batches:
            for name, feed in feeds.items():
                step, state = steps[name]
                t = time.perf_counter()
                mx.eval(step(*feed.inputs(examples, b)), state)
                times[name].append(time.perf_counter() - t)
            tokens, _ = collate(examples, b)
            t = time.perf_counter()
            mx.eval(cached.cut.prefix(tokens[:, :-1]))
            times["frozen-prefix forward (epoch 1 only)"].append(time.perf_counter() - t)
    skip = len(batches)
    for name, ts in times.items():
        print(f"{name:38s} {statistics.median(ts[skip:]):7.3f} s/step (median of {len(ts) - skip})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
