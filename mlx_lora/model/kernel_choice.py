"""Which of the CPU kernels this machine runs faster than MLX's own: each timed against MLX's at
the model's shapes when a command first asks (forward and backward for training, forward for the
others), kept per machine in mlx-lora's cache directory, and used only where it measured faster.

A kernel tuned on one CPU can lose on another (issue 34: on a Xeon our attention made the training
step 3x slower while it won on an EPYC), so nothing is assumed: MLX_LORA_CPU_KERNELS=on takes every
kernel without measuring, =off none.
"""

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version

import mlx.core as mx

from mlx_lora import atomic
from mlx_lora.errors import UserError
from mlx_lora.machine import cpu, platform_cache

ENV = "MLX_LORA_CPU_KERNELS"  # auto (default): measured; on: all of ours; off: MLX's own
CACHE_FILE = "cpu-kernels.json"
MARGIN = 0.95  # ours is taken only when this much faster: within noise MLX's own stays
REPEATS = 3  # timings of each side, alternating; the fastest counts (noise only ever adds time)
SLOW_CALL = 0.2  # s: a call this slow is timed once (a large vocabulary's loss)


@dataclass(frozen=True)
class Candidate:
    """One kernel: ours and MLX's own, computing the same thing from `inputs()`."""

    ours: Callable
    theirs: Callable
    inputs: Callable[[], tuple]
    compiled: bool = True  # False: timed as an uncompiled model runs it, a decoding step's operations


@dataclass(frozen=True)
class Choice:
    kernels: frozenset[str]  # the ones ours
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (ours, MLX's) in ms
    how: str = ""  # measured now, read from the cache, or forced by the environment

    def line(self) -> str:
        parts = []
        for name, (ours, theirs) in sorted(self.timings.items()):
            who = "ours" if name in self.kernels else "MLX's"
            parts.append(f"{name} {who} ({ours:.2f} against MLX's {theirs:.2f} ms)")
        if not parts:
            parts = [", ".join(sorted(self.kernels)) or "none of ours"]
        return f"CPU kernels ({self.how}): " + ", ".join(parts)


def mode() -> str:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("off", "0", "false", "no"):
        return "off"
    return "on" if value in ("on", "1", "true", "yes") else "auto"


def choose(candidates: dict[str, Candidate], shapes: dict, training: bool) -> Choice:
    """The kernels to use for a model of `shapes` (the cache's key, with this machine and library)."""
    if mode() == "on":
        return Choice(frozenset(candidates), how=f"{ENV}=on")
    versions = {"mlx": version("mlx"), "mlx-lora": version("mlx-lora")}  # new kernels, measured anew
    key = json.dumps({"cpu": cpu(), **versions, "training": training, **shapes}, sort_keys=True)
    path = platform_cache() / CACHE_FILE
    kept = _read(path)
    if key in kept:
        timings = {k: tuple(v) for k, v in kept[key]["timings"].items()}
        return Choice(frozenset(kept[key]["kernels"]), timings, "measured before on this CPU")
    start = time.perf_counter()
    timings = {name: _time(c, training) for name, c in candidates.items()}
    chosen = frozenset(n for n, (ours, theirs) in timings.items() if ours < MARGIN * theirs)
    kept[key] = {"kernels": sorted(chosen), "timings": timings}
    with contextlib.suppress(OSError, UserError):  # a cache it cannot write: measured again next time
        atomic.write_json(path, kept)
    return Choice(chosen, timings, f"measured on this CPU in {time.perf_counter() - start:.1f} s")


def _read(path) -> dict:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _time(candidate: Candidate, training: bool) -> tuple[float, float]:
    """(ours, MLX's) in ms: compiled, warmed up, the fastest of REPEATS alternating calls each."""
    args = candidate.inputs()
    mx.eval(args)
    fns = [_timed_fn(f, args, training, candidate.compiled) for f in (candidate.ours, candidate.theirs)]
    for fn in fns:
        mx.eval(fn(*args))  # compiles
    best = [float("inf")] * 2
    for i in range(REPEATS):
        for j, fn in enumerate(fns):
            if i and best[j] > SLOW_CALL:
                continue
            t = time.perf_counter()
            mx.eval(fn(*args))
            best[j] = min(best[j], time.perf_counter() - t)
    return round(1000 * best[0], 3), round(1000 * best[1], 3)


def _timed_fn(fn: Callable, args: tuple, training: bool, compiled: bool) -> Callable:
    if not training:
        return mx.compile(fn) if compiled else fn
    weights = mx.random.normal(fn(*args).shape)  # a cotangent of its own per element, as a loss gives
    floats = tuple(i for i, a in enumerate(args) if mx.issubdtype(a.dtype, mx.floating))
    return mx.compile(mx.grad(lambda *a: (fn(*a) * weights).sum(), argnums=floats))
