"""A helper process that stops a rank whose wait for its group has no end.

MLX's collectives give no timeout: `mx.distributed.init` blocks (holding the GIL, so no thread of
ours could act) until every rank has joined, and a peer that hangs or drops off the network leaves
an all_sum waiting forever. This helper needs nothing from MLX: the rank arms it before a wait
and disarms it after; a deadline that passes gets a one-line message and SIGKILL, the only signal
a process blocked in C++ cannot defer. It exits by itself when its rank does (end of its pipe).

Protocol on stdin, one line each: "<seconds> <what>" arms, "-" disarms.
"""

import os
import select
import signal
import sys
import time


def watch(rank: str, pid: int) -> None:
    deadline, what, armed_for = None, "", 0.0
    pending = b""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], wait)
        if not ready:
            sys.stderr.write(
                f"error: rank {rank}: waited {armed_for:.0f} s for the other processes {what}; one of them "
                "died or hangs, so this process stops too (raise --peer-timeout if a step is really that slow)\n"
            )
            sys.stderr.flush()
            os.kill(pid, signal.SIGKILL)
            return
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:  # our rank has exited
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"-":
                deadline = None
            else:
                seconds, _, label = line.decode().partition(" ")
                armed_for, what = float(seconds), label
                deadline = time.monotonic() + armed_for


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[2]))
