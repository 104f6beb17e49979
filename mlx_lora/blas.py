"""A fast BLAS for MLX on Linux CPUs, switched on before MLX loads.

The `mlx[cpu]` wheel links a bundled reference BLAS (libblas-*.so in mlx_cpu.libs) that runs
sgemm at ~5 GFLOP/s. MLX calls it through the dynamic symbol `cblas_sgemm`, so an optimized
library loaded RTLD_GLOBAL *before* `mlx.core` is imported takes precedence (the same effect as
LD_PRELOAD, without re-executing Python). Debian/Ubuntu: `apt install libopenblas0-pthread`.

MLX_LORA_BLAS=off keeps MLX's own BLAS; MLX_LORA_BLAS=/path/to/libopenblas.so picks a library.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_lora.errors import UserError

ENV = "MLX_LORA_BLAS"
OFF = ("0", "off", "false", "no")
CANDIDATES = (
    f"/usr/lib/{platform.machine()}-linux-gnu/libopenblas.so.0",  # Debian, Ubuntu
    "/usr/lib64/libopenblas.so.0",  # Fedora, RHEL
    "/usr/lib/libopenblas.so.0",  # Arch, Alpine
)
INSTALL_HINT = "sudo apt install libopenblas0-pthread (Debian/Ubuntu) or dnf install openblas (Fedora)"

# What happened, for the one line the CLI prints: (used library or None, reason).
status: tuple[str | None, str] = (None, "not checked")
_library: ctypes.CDLL | None = None  # the library loaded, to set its thread count


def _bundled_reference_blas() -> bool:
    """True for the mlx[cpu] wheel on Linux, whose bundled libblas is the slow reference one."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return False
    # Every location: a stray `mlx/` folder in the working directory makes mlx a namespace
    # package whose first location is that folder, not the wheel's.
    return any(any((Path(loc).parent / "mlx_cpu.libs").glob("libblas*.so*")) for loc in spec.submodule_search_locations)


def _find_openblas() -> str | None:
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def enable() -> tuple[str | None, str]:
    """Load an optimized BLAS globally if that helps and is safe; idempotent; never raises."""
    global status, _library
    choice = os.environ.get(ENV, "").strip()
    if sys.platform != "linux":
        status = (None, "not Linux: MLX uses Accelerate or its GPU")
    elif choice.lower() in OFF:
        status = (None, f"{ENV}={choice}: using MLX's bundled BLAS")
    elif "mlx.core" in sys.modules and status[0] is None:
        status = (None, "mlx was imported before mlx_lora, too late to switch BLAS")
    elif status[0] is not None:
        pass
    elif not _bundled_reference_blas():
        status = (None, "this MLX build has no bundled reference BLAS to replace")
    else:
        path = choice or _find_openblas()
        if path is None:
            status = (None, f"no OpenBLAS found; MLX matmuls run ~40x slower on its bundled BLAS: {INSTALL_HINT}")
        else:
            try:
                _library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                status = (path, f"MLX matmuls use {Path(path).name} ({ENV}=off to disable)")
            except OSError as e:
                status = (None, f"{ENV}: cannot load {path} ({e}); using MLX's bundled BLAS")
    return status


def sets_threads() -> bool:
    """True when `one_thread()` takes effect: an OpenBLAS this module loaded."""
    return _library is not None and hasattr(_library, "openblas_set_num_threads")


@contextmanager
def one_thread() -> Iterator[None]:
    """Every matmul on one thread inside the block, for work spread over MLX streams, a core each."""
    if not sets_threads():
        yield
        return
    threads = _library.openblas_get_num_threads()
    _library.openblas_set_num_threads(1)
    try:
        yield
    finally:
        _library.openblas_set_num_threads(threads)


def note() -> str | None:
    """The line a training run prints about the BLAS on Linux: the library in use, or that the
    slow bundled one is (with how to get a fast one); None where there is nothing to say."""
    used, reason = status
    if sys.platform == "linux" and (used or "no OpenBLAS" in reason):
        return f"blas: {reason}"
    return None


def check() -> None:
    """Compare one MLX matmul with NumPy's, so a broken library stops the run instead of training on garbage."""
    if status[0] is None:
        return
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((67, 129), np.float32), rng.standard_normal((129, 33), np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    if not np.allclose(got, a.astype(np.float64) @ b, atol=1e-3):
        raise UserError(f"{status[0]} gives wrong matmul results; run with {ENV}=off")
