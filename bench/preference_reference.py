"""The one-off reference pass and a DPO step, each with the whole-model forward (full logits, no
cut) and with the cut (logits at completion tokens only, frozen blocks computed once and kept),
on the same model, pairs and batches in one process: seconds (wall and CPU) and peak MLX memory.

    python bench/preference_reference.py --model DIR --rows 40 --num-layers 4
"""

import argparse
import time
from pathlib import Path

import mlx_lora  # noqa: F401  (OpenBLAS for MLX, which must come before mlx.core)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_lora.config import LoRAConfig
from mlx_lora.data.preference import collate_pairs, load_pairs
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import apply_lora, first_adapted_block
from mlx_lora.training.objectives import Objective
from mlx_lora.training.preference import PreferenceFeed, pair_cut
from mlx_lora.training.step import make_step

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    mx.reset_peak_memory()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu, mx.get_peak_memory() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "mlx_lora" / "default_model"))
    p.add_argument("--data", default=str(ROOT / "data" / "preference" / "train.jsonl"))
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    base = load_base(args.model)
    use_cpu_kernels(base.model)  # as train runs it
    apply_lora(base.model, LoRAConfig(targets="q_proj,v_proj", num_layers=args.num_layers, rank=8, alpha=16))
    mx.eval(base.model.parameters())  # loading is not part of either pass
    pairs = load_pairs(Path(args.data), base.tokenizer, 2048, max_rows=args.rows)
    cut = pair_cut(base.model, first_adapted_block(base.model), pairs)
    ways = {"whole forward": (None, False), "cut + prefix cache": (cut, True)}
    print(f"{len(pairs)} pairs, batches of {args.batch_size}, LoRA on the last {args.num_layers} blocks")
    print(f"{'':28}  {'wall s':>7}  {'cpu s':>7}  {'peak GB':>7}")
    for _ in range(args.repeats):  # alternated, so a busy machine slows both alike
        for name, (c, cache) in ways.items():
            feed = PreferenceFeed(Objective("dpo", 0.1), c, cache)
            ref, *figures = timed(lambda f=feed: f.reference_logps(base.model, pairs, args.batch_size))
            feed.reference[id(pairs)] = ref
            print(f"{name + ', reference pass':28}  {figures[0]:7.2f}  {figures[1]:7.2f}  {figures[2]:7.3f}")
            step, state = make_step(base.model, optim.Adam(learning_rate=0.0), feed=feed)

            def one_step(rows, step=step, state=state, feed=feed):
                mx.eval(state, step(feed.inputs(pairs, rows, collate_pairs(pairs, rows)), None, True))

            for i in range(args.steps):
                _, *figures = timed(lambda i=i: one_step(list(range(i * args.batch_size, (i + 1) * args.batch_size))))
                if i > 0:  # the first traces and compiles the step
                    print(f"{name + ', step':28}  {figures[0]:7.2f}  {figures[1]:7.2f}  {figures[2]:7.3f}")
            print(f"  reference log-probs: {np.round(ref[:2], 3).tolist()} ...")


if __name__ == "__main__":
    main()
