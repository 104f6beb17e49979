"""Time to the first training step and peak memory as the training set grows, with and without --data-cache.

    python bench/data_start.py --work /tmp/data-bench --rows 10000,100000,1000000

For each size it writes a synthetic prompt/completion JSONL set (no validation split, so 5% is held
out) and runs `mlx-lora train --iters 1` with the shipped model three times, each in a fresh process:
without a cache, with an empty --data-cache (tokenize and write) and again (read the cache). It
reports the seconds from launch to the line of step 1 and the process's peak RSS (wait4).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CASES = (("no cache", False, True), ("cache, first run", True, True), ("cache, later run", True, False))


def write_set(directory: Path, rows: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.jsonl"
    if not path.exists():
        with open(path, "w") as f:
            for i in range(rows):
                a, b = i % 1000, (i * 7) % 97
                row = {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a} + {b} = {a + b}. #### {a + b}"}
                f.write(json.dumps(row) + "\n")
    return directory


def run(data: Path, out: Path, cache: Path | None) -> tuple[float, float]:
    """(seconds to the step-1 line, peak RSS in GB) of one `mlx-lora train --iters 1`."""
    cmd = [sys.executable, "-m", "mlx_lora.cli", "train", "--data", str(data), "--iters", "1", "--val-batches", "1"]
    cmd += ["--save-every", "0", "--adapter-path", str(out)] + (["--data-cache", str(cache)] if cache else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    for line in proc.stdout:
        if first_step is None and line.startswith("step 1/1  loss"):
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or first_step is None:
        raise SystemExit(f"{' '.join(cmd)} failed (status {status})")
    return first_step, usage.ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/data-bench"))
    parser.add_argument("--rows", default="10000,100000", help="comma-separated training-set sizes")
    args = parser.parse_args()
    print("| rows | run | to first step (s) | peak RSS (GB) |\n|---:|---|---:|---:|")
    for rows in (int(n) for n in args.rows.split(",")):
        data = write_set(args.work / f"rows-{rows}", rows)
        cache = args.work / f"cache-{rows}"
        for name, cached, fresh in CASES:
            if fresh and cache.exists():
                shutil.rmtree(cache)
            seconds, gigabytes = run(data, args.work / "adapters", cache if cached else None)
            print(f"| {rows:,} | {name} | {seconds:.1f} | {gigabytes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
