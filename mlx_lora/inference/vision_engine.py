"""A vision-language base served one request at a time, each through mlx-vlm as `generate --image` runs.

mlx-lm's BatchGenerator decodes token ids alone; a request with images needs mlx-vlm's processor and
vision tower before its first token, so requests wait in line and are answered in turn. The engine
answers as BatchEngine does (the same Job, Event, stop strings and text held back), so serve's HTTP
face is the same. Adapters sit in the same slots (multi_lora.AdapterSlots): the one row decoded is
given the slot of its request's adapter.
"""

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_lora.errors import UserError
from mlx_lora.inference.batching import Event, Job, Sampling, advance, emit_event
from mlx_lora.inference.generation import vision_responses
from mlx_lora.inference.multi_lora import AdapterSlots
from mlx_lora.model.base import Base


@dataclass(frozen=True)
class VisionPrompt:
    """A request's prompt: text in the chat template with one placeholder per image, the images in order."""

    text: str
    images: tuple = ()  # PIL images


class VisionEngine:
    """The base with its adapters in slots, and the thread that answers the requests in turn."""

    def __init__(self, base: Base):
        self.base = base
        self.adapters = AdapterSlots(base)
        self.vocab = len(base.tokenizer.get_vocab())
        self.peak_mix = 0  # adapters in one step: 1 once a request ran (one row)
        self.steps = 0  # tokens decoded
        self.prefill_steps = 0  # prompts read
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-lora-vision", daemon=True)
        self._thread.start()

    # --- from any thread -------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.adapters.names)

    @property
    def active(self) -> int:
        return len(self._waiting) + (self._running is not None)

    def submit(self, tokens: list[int], adapter: str | None, sampling: Sampling, emit, prompt: VisionPrompt) -> Job:
        job = Job(list(tokens), adapter, sampling, emit, self.base.tokenizer.detokenizer, prompt=prompt)
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """Stop the job at its next token (or before it starts); nothing more is emitted for it."""
        job.cancelled = True

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker between two tokens (it may change the model); its result in the Future."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def add_adapter(self, name: str, directory: Path) -> Future:
        return self.call(lambda: self.adapters.add(name, directory))

    def remove_adapter(self, name: str) -> Future:
        return self.call(lambda: self._remove(name))

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    # --- on the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._drain(block=not self._waiting)
            if self._waiting:
                job = self._waiting.popleft()
                if not job.cancelled:
                    self._answer(job)

    def _drain(self, block: bool) -> None:
        """Handle every message waiting; when idle, wait for the first one."""
        try:
            message = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = message
            if kind == "submit":
                self._waiting.append(payload)
            elif kind == "call":
                fn, future = payload
                try:
                    future.set_result(fn())
                except Exception as e:  # handed to the caller, who turns a UserError into a 4xx
                    future.set_exception(e)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _answer(self, job: Job) -> None:
        if job.adapter is not None and job.adapter not in self.adapters.names:
            emit_event(job, Event("", "error", error=f"the adapter '{job.adapter}' was removed", status=404))
            return
        self._running = job
        try:
            self._decode(job)
        except Exception as e:  # one failed request ends, never the server
            emit_event(job, Event("", "error", job.prompt_tokens, job.generated, error=f"{type(e).__name__}: {e}"))
        finally:
            self._running = None

    def _decode(self, job: Job) -> None:
        """mlx-vlm's responses to the job's prompt, one row in the adapter's slot, seeded as `generate` is."""
        job.slot = self.adapters.slot(job.adapter)
        self.adapters.rows.index = mx.array([job.slot])
        self.peak_mix = max(self.peak_mix, 1)
        self.prefill_steps += 1
        sampling = job.sampling
        if sampling.seed is not None:
            mx.random.seed(sampling.seed % 2**32)
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p)
        prompt = job.prompt
        for r in vision_responses(self.base, prompt.text, list(prompt.images), sampling.max_tokens, sampler):
            job.prompt_tokens = r.prompt_tokens
            self.steps += r.finish_reason is None
            token = None if r.finish_reason or r.token is None else int(r.token)  # the last repeats the last token
            if advance(job, token, r.finish_reason) or job.cancelled or self._stopping:
                return
            self._drain(block=False)  # adapters come and go between tokens; the row keeps its slot

    def _remove(self, name: str) -> None:
        if name not in self.adapters.names:
            raise UserError(f"no adapter named '{name}'; loaded: {', '.join(self.adapters.names) or 'none'}")
        busy = sum(job.adapter == name and not job.cancelled for job in [*self._waiting, self._running] if job)
        if busy:
            raise UserError(f"the adapter '{name}' is answering {busy} request(s); delete it when they are done")
        self.adapters.remove(name)
