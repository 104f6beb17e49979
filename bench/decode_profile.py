"""Where one decoding step's time goes: the blocks' linear layers, the output head, everything else.

    python bench/decode_profile.py SmolLM2-135M-Instruct.Q4_1.gguf      # any --model a command takes

The base is loaded as `generate` loads it (float32 compute on the CPU, `use_cpu_kernels(decoding=True)`:
a quantized base keeps its weights de-quantized where that measured faster). One row is read to
--position tokens, then single-token steps are timed (median, each step evaluated on its own) three
ways, alternating for --rounds: the model as is; every linear layer inside the blocks answering a
constant of its output's shape (no matmul, no weight read); and the output head too. The
differences are the blocks' matmuls and the head's, and the last is everything else (norms,
attention, RoPE, the KV cache, the graph). Each matmul part is also given as the weight bytes it
reads per token over its time: a one-row step reads every weight once. The differences are upper
bounds of what the matmuls themselves take: with them gone, the step's other operations also stop
waiting on them (each of a step's MLX operations is dispatched to the stream's thread, and its
count, printed first, costs time of its own: bench/RESULTS.md, "One stream in fewer operations").
"""

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import mlx_lora  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels

LINEAR = (nn.Linear, nn.QuantizedLinear)
EMBEDDING = (nn.Embedding, nn.QuantizedEmbedding)


def weight_bytes(module: nn.Module) -> int:
    """What a one-row matmul reads: the weight the step multiplies (a kept de-quantized copy, else its own)."""
    held = vars(module).get("dequantized")
    if held is not None:
        return held.weight.nbytes
    return sum(v.nbytes for k, v in module.parameters().items() if k in ("weight", "scales", "biases"))


def constant_class(cls: type) -> type:
    """`cls` answering a constant of its output's shape, from __call__ and, for an embedding, as_linear."""
    constants = {}

    def constant(self, x):
        out = (self.scales if hasattr(self, "scales") else self.weight).shape[0]
        key = (x.shape[:-1], out)
        if key not in constants:
            constants[key] = mx.full((*x.shape[:-1], out), 0.01)
            mx.eval(constants[key])
        return constants[key]

    methods = {"as_linear": constant} if issubclass(cls, EMBEDDING) else {"__call__": constant}
    return type(cls.__name__, (cls,), methods)


def operations(model: nn.Module, prompt: mx.array) -> int:
    """How many MLX operations one decoding step's graph holds (as mx.export_to_dot writes them)."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt, cache=cache))
    with tempfile.NamedTemporaryFile(suffix=".dot") as dot:
        mx.export_to_dot(dot.name, model(mx.array([[42]]), cache=cache))
        return len(re.findall(r'label ="[A-Za-z]', Path(dot.name).read_text()))


def step_ms(model: nn.Module, prompt: mx.array, steps: int) -> float:
    cache = make_prompt_cache(model)
    mx.eval(model(prompt, cache=cache))
    token, times = mx.array([[42]]), []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(model(token, cache=cache))
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--position", type=int, default=120, help="tokens read before the timed steps")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    base = load_base(args.model, compute="auto")
    lines = []
    use_cpu_kernels(base.model, decoding=True, log=lines.append)
    print(*lines)
    modules = dict(base.model.named_modules())
    blocks = {n: m for n, m in modules.items() if ".layers." in f".{n}" and isinstance(m, LINEAR)}
    head = modules.get("lm_head") or next(m for n, m in modules.items() if n.endswith("embed_tokens"))
    own = {n: type(m) for n, m in modules.items()}

    def swap(names):
        for n, m in modules.items():
            m.__class__ = constant_class(own[n]) if n in names else own[n]

    head_name = next(n for n, m in modules.items() if m is head)
    ways = {"whole step": set(), "block linears constant": set(blocks), "and the head": {*blocks, head_name}}
    prompt = mx.array([list(range(100, 100 + args.position))])
    print(f"  {operations(base.model, prompt)} MLX operations a step")
    times = {w: [] for w in ways}
    for _ in range(args.rounds):
        for way, names in ways.items():
            swap(names)
            times[way].append(step_ms(base.model, prompt, args.steps))
    swap(set())
    whole, no_blocks, neither = (statistics.median(times[w]) for w in ways)
    for way in ways:
        print(f"  {way:<26} {statistics.median(times[way]):7.1f} ms  ({', '.join(f'{t:.1f}' for t in times[way])})")
    parts = (
        ("the blocks' linear layers", whole - no_blocks, sum(map(weight_bytes, blocks.values()))),
        ("the output head", no_blocks - neither, weight_bytes(head)),
    )
    for name, ms, nbytes in parts:
        print(f"  {name:<26} {ms:7.1f} ms  {nbytes / 1e6:6.0f} MB a token, {nbytes / ms / 1e6:5.1f} GB/s")
    print(f"  {'everything else':<26} {neither:7.1f} ms")


if __name__ == "__main__":
    main()
