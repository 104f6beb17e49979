"""Where one epoch-1 training step goes, ours and PEFT+torch's, on the same 4 rows.

    python bench/profile_step.py MODEL_DIR DATA_DIR     # e.g. the dirs bench/train_speed.py --work made

Ours: each piece of a step timed alone (median of 6, after a warm-up), from the same batch:
the frozen prefix (blocks before the first trained one; on one stream, and split over a stream
per core as training runs it), the trained blocks forward, the head and loss at the target
positions, and the whole compiled step (forward, backward, AdamW).
torch: torch.profiler over 6 steps of PEFT's usual loop, operators by self CPU time.
Set MLX_LORA_CPU_KERNELS=off (or =on) to see ours on MLX's own kernels (or all of ours, unmeasured).
"""

import statistics
import sys
import tempfile
import time
from dataclasses import replace


def median_ms(fn, n: int = 6) -> float:
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def ours(model: str, data: str) -> tuple:
    """Times the pieces of our step; returns the batch it used (tokens, per-row lengths) for torch's."""

    from mlx_lora.config import TrainConfig
    from mlx_lora.data.batches import collate, iterate_batches
    from mlx_lora.model.cpu_kernels import choose_kernels, wanted
    from mlx_lora.training.feed import _chunk_ce
    from mlx_lora.training.loop import build_run
    from mlx_lora.training.prefix_cache import prefix, split_streams

    cfg = TrainConfig(model=model, data=data, targets="q_proj,v_proj", num_layers=4, rank=8, alpha=16.0)
    run = build_run(replace(cfg, adapter_path=tempfile.mkdtemp()), log=lambda s: None)
    feed, examples, cut = run.feed, run.data["train"], run.feed.cut
    rows, batch, count = next(iterate_batches(examples, 4, 0))
    tokens = collate(examples, rows)[0][:, :-1]
    inputs = feed.inputs(examples, rows, batch)
    inp, states, positions, targets, _, *head = inputs  # head: the first tokens all rows share (Feed.inputs)

    def trained():
        return cut.hidden_after(*head, inp, states) if head else cut.hidden(inp, states)

    picked = trained().reshape(-1, states.shape[-1])[positions]
    streams = split_streams(cut.model)
    parts = {
        f"frozen prefix: blocks 0-{cut.k - 1} forward, one stream": lambda: cut.prefix(tokens),
        f"the same, rows split over {len(streams)} streams": lambda: prefix(cut, [tokens[:2], tokens[2:]], streams),
        "trained blocks forward" + (f", the rows' first {head[0].shape[1]} tokens once" if head else ""): trained,
        f"head + loss forward at {positions.shape[0]} target rows": lambda: _chunk_ce(cut, targets, picked),
        "compiled step from the prefix (fwd + bwd + AdamW)": lambda: (run.step(inputs, None, True), run.state)[0],
    }
    kernels = choose_kernels(cut.model, True).line() if wanted() else "MLX's own kernels"
    print(f"ours: batch {tuple(tokens.shape)}, {count} real tokens; {kernels}")
    for name, fn in parts.items():
        print(f"  {name:55s} {median_ms(fn):7.1f} ms", flush=True)
    full = collate(examples, rows)[0]
    return full.tolist(), [len(examples[i].tokens) for i in rows]


def torch_side(model: str, batch: tuple) -> None:
    """PEFT's loop on the very rows ours timed (any data format: the tokens come from ours)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    n = net.config.num_hidden_layers
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(n - 4, n))
    )
    net = get_peft_model(net, lora)
    ids, lengths = batch
    x = torch.tensor(ids)
    att = (torch.arange(x.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step():
        net(input_ids=x, attention_mask=att, labels=x.masked_fill(att == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(6):
            step()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: batch {tuple(x.shape)}, "
        f"{(time.perf_counter() - t) / 6 * 1000:.0f} ms/step under the profiler"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    import mlx_lora  # noqa: F401  (OpenBLAS before mlx.core)
    from mlx_lora import allocator

    allocator.keep_freed_memory()  # as every mlx-lora command does

    torch_side(sys.argv[1], ours(sys.argv[1], sys.argv[2]))
