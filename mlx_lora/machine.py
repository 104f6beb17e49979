"""What this machine offers MLX, for the commands that size their work to it (train, info, fuse)."""

import os

import mlx.core as mx


def available_bytes() -> int:
    """What the accelerator may use: Metal's recommended working set or the device memory, else RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
