"""glibc keeps what MLX frees: a repeated computation whose temporaries outgrow MLX's 32 MB
buffer cache stops faulting its pages in anew."""

import json
import resource
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, mlx_lora, mlx.core as mx
from mlx_lora import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
x = mx.random.normal((64, 49152))  # a step's logits on a 49k vocabulary: 12.6 MB
work = lambda: mx.eval([x + i for i in range(4)])  # four arrays of that size, freed after each call
work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    work()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3))
"""

TEMPORARY = 64 * 49152 * 4  # bytes: one of the four float32 arrays a call makes
MLX_CACHE = 32 * 2**20  # MLX's CPU buffer cache at most (mlx_lora/allocator.py)


def faults_per_call(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_memory_is_kept_so_repeated_work_faults_no_pages_in():
    kept, default = faults_per_call("keep"), faults_per_call("default")
    # Without: each call's four 12.6 MB temporaries, less the 32 MB MLX's cache can keep, are mapped
    # anew and faulted in page by page (measured 6.1k pages a call); with: none of them.
    assert default >= (4 * TEMPORARY - MLX_CACHE) // resource.getpagesize(), f"{default} page faults a call without"
    assert kept < 100, f"{kept} page faults a call with freed memory kept ({default} without)"
