"""Ctrl-C and SIGTERM during training: note the signal, so the loop can finish its step and
write a checkpoint before it stops, instead of dying mid-step or mid-write."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    signum: int | None = None  # set by the first SIGINT/SIGTERM


@contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield request
        return

    def handle(signum, frame):
        request.signum = signum
        signal.signal(signum, previous[signum])  # a second signal acts at once

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
