"""What this machine offers MLX, for the commands that size their work to it (train, info, fuse),
what it is (the CPU kernels' choice is kept per machine), and where mlx-lora keeps its caches."""

import os
import platform
import sys
from functools import cache
from pathlib import Path

import mlx.core as mx


def available_bytes() -> int:
    """What the accelerator may use: Metal's recommended working set or the device memory, else RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


CACHE_ENV = "MLX_LORA_CACHE"  # moves mlx-lora's cache directory
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")  # what a kernel's speed depends on


def platform_cache() -> Path:
    """mlx-lora's cache directory: $MLX_LORA_CACHE, else ~/Library/Caches/mlx-lora on macOS, else
    $XDG_CACHE_HOME/mlx-lora (~/.cache/mlx-lora)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-lora"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".cache") / "mlx-lora"


@cache
def cpu() -> dict:
    """The CPU as /proc/cpuinfo names it (lscpu's model name), its vector features and cores."""
    info = {"model": platform.processor() or platform.machine(), "features": [], "cores": os.cpu_count() or 1}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's, all alike
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["model"] = fields.get("model name") or fields.get("Model name") or info["model"]
    info["features"] = [f for f in CPU_FEATURES if f in flags]
    return info
