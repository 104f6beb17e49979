"""Data-parallel training over MLX's own engine: `mx.distributed`, started by `mlx.launch`.

Every rank holds the whole model and data and takes every size-th row of each global batch (the
batch order is the one-process order). The step sums loss and gradients over targets, so one
all_sum of those sums and of the target counts gives every rank the one-process step on the
whole batch, up to fp32 summation order, and every rank applies the same update. Only rank 0
prints and writes files. A process started alone is a group of one and none of this costs it.
"""

import os
import subprocess
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_lora.data.examples import ExampleSet
from mlx_lora.data.preference import Pair
from mlx_lora.errors import UserError

# What mlx.launch (ring, JACCL, NCCL) or mpirun sets in each rank, and the backend it means:
# join that one, not whichever loads first. None of them set: started alone.
LAUNCHED = {
    "MLX_HOSTFILE": "ring",
    "MLX_IBV_DEVICES": "jaccl",
    "NCCL_HOST_IP": "nccl",
    "OMPI_COMM_WORLD_RANK": "mpi",
    "PMI_RANK": "mpi",
}
RANK_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# MLX's backends prefix their errors so; a lost peer surfaces as one of these from any eval.
BACKEND_ERRORS = ("[ring]", "[mpi]", "[nccl]", "[jaccl]")
WATCHDOG = Path(__file__).with_name("watchdog.py")


@dataclass(frozen=True)
class World:
    group: mx.distributed.Group | None = None
    rank: int = 0
    size: int = 1
    timeout: float = 0.0  # --peer-timeout
    watchdog: subprocess.Popen | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's rows of a global batch. Strided, not contiguous: a batch's rows are sorted
        by length, so every rank gets rows of about the same length and nobody waits long."""
        return indices[self.rank :: self.size]

    def sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is on one (a signal that reached some ranks only)."""
        if self.size == 1:
            return flag
        with self.waiting("to agree whether to stop"):
            return self.sum(mx.array(flag, mx.int32)).item() > 0

    @contextmanager
    def waiting(self, what: str):
        """Bound a wait on the other ranks by --peer-timeout (watchdog.py ends this process)."""
        if self.watchdog is None:
            yield
            return
        self._tell(f"{self.timeout:g} {what}")
        try:
            yield
        finally:
            self._tell("-")

    def _tell(self, line: str) -> None:
        self.watchdog.stdin.write(line.encode() + b"\n")
        self.watchdog.stdin.flush()


SOLO = World()


def init(timeout: float) -> World:
    """Join the group mlx.launch (or mpirun) started; a process started alone is a group of one."""
    backend = next((b for var, b in LAUNCHED.items() if os.environ.get(var)), None)
    hostfile = Path(os.environ.get("MLX_HOSTFILE", ""))
    if backend is None or (backend == "ring" and hostfile.is_file() and not hostfile.read_text().strip()):
        return SOLO  # alone, or `mlx.launch -n 1` (an empty hostfile)
    rank = env_rank()
    # Python's executable, not `python -m`: the helper needs neither MLX nor this package.
    watchdog = subprocess.Popen([sys.executable, str(WATCHDOG), rank, str(os.getpid())], stdin=subprocess.PIPE)
    world = World(timeout=timeout, watchdog=watchdog)
    with world.waiting("to join the group (mx.distributed.init)"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise UserError(
                f"rank {rank}: cannot join the {backend} group ({e}); check the hosts given to mlx.launch"
            ) from None
    if group.size() == 1:
        watchdog.stdin.close()  # the helper exits at the end of its input
        return SOLO
    return replace(world, group=group, rank=group.rank(), size=group.size())


def env_rank() -> str:
    return next((os.environ[k] for k in RANK_ENV if k in os.environ), "?")


def quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: one voice per group."""


class Silent:
    """Stands in for rank 0's reporters (TrainMonitor) on the other ranks: every call does nothing."""

    def __getattr__(self, name: str):
        return quiet


def sum_over(world: World, loss: mx.array, ntoks: mx.array, grads: Any, stats: list = ()) -> tuple:
    """This rank's target-summed loss, target count, gradients (and a preference feed's sums of
    rewards and accuracy) -> the whole group's, in one all_sum (MLX's bucketed
    average_gradients, whose division by the size is undone: exact for 2, 4, 8 ranks, and only
    ratios of these are used)."""
    if world.size == 1:
        return loss, ntoks, grads, list(stats)
    sums = {"loss": loss, "ntoks": ntoks, "grads": grads} | ({"stats": list(stats)} if stats else {})
    total = tree_map(lambda x: x * world.size, nn.average_gradients(sums, world.group))
    return total["loss"], total["ntoks"], total["grads"], total.get("stats", [])


def checksum(examples: ExampleSet | list[Pair] | list, chunk: int = 2**22) -> int:
    """Over the flat arrays, a chunk at a time (a set read from --data-cache is never read whole);
    preference pairs over each side's tokens and mask; other rows (GRPO's prompts) over what
    bytes() makes of each."""
    if examples and not isinstance(examples, ExampleSet) and not isinstance(examples[0], Pair):
        return zlib.crc32(b"".join(map(bytes, examples)))
    if not isinstance(examples, ExampleSet):
        arrays = [a for pair in examples for side in (pair.chosen, pair.rejected) for a in (side.tokens, side.mask)]
        return zlib.crc32(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    crc = zlib.crc32(np.ascontiguousarray(examples.offsets))
    for array in (examples.tokens, examples.mask):
        for start in range(0, len(array), chunk):
            crc = zlib.crc32(np.ascontiguousarray(array[start : start + chunk]), crc)
    return crc


def check_group(
    world: World, data: dict[str, ExampleSet], trainable: int, *, iters: int, batch_size: int, seed: int
) -> None:
    """Every rank must train the same model on the same data with the same options, else the
    summed gradients mean nothing; hosts read their own --data and --model, so compare."""
    if world.size == 1:
        return
    if batch_size < world.size:
        raise UserError(
            f"--batch-size {batch_size} is the batch of the whole group: "
            f"give at least one row to each of its {world.size} processes"
        )
    facts = {
        "train data checksum": checksum(data["train"]),
        "valid data checksum": checksum(data["valid"]),
        "trainable parameters": trainable,
        "iters": iters,
        "batch size": batch_size,
        "seed": seed,
    }
    with world.waiting("to compare their data and options"):
        table = mx.distributed.all_gather(mx.array(list(facts.values()), mx.int64), group=world.group)
        rows = table.reshape(world.size, len(facts)).tolist()  # (size, facts)
    differ = [
        f"{name} (rank 0: {rows[0][i]}, rank {r}: {row[i]})"
        for i, name in enumerate(facts)
        for r, row in enumerate(rows)
        if row[i] != rows[0][i]
    ]
    if differ:
        raise UserError(
            f"the processes of the group differ in {'; '.join(differ)}: every host needs the same "
            "--data, --model and options"
        )


@contextmanager
def peer_errors():
    """A peer that died makes MLX raise RuntimeError('[ring] ...') from whatever evaluates next:
    say what that means in one line instead of a traceback."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(BACKEND_ERRORS):
            raise
        raise UserError(
            f"rank {env_rank()}: {e}: another process of the group died or was stopped (its own output says why); "
            "this one stops too"
        ) from None
