"""Continuous batching over many adapters: one worker thread drives mlx-lm's BatchGenerator.

Requests arrive from any thread (`submit`, `cancel`, `call`) through one queue; the worker inserts
them into the running batch between steps, so a request joins as soon as a row is free and leaves
as soon as it ends. A step decodes one token of every row and reads one chunk (`prefill_step`
tokens a row) of the prompts being read, so a long prompt holds the worker for one chunk at a
time: a request cancelled while its prompt is read stops within a chunk, and others join meanwhile.

Every row carries its adapter's slot (multi_lora.RoutedModel), so one batch may mix any adapters
and the base. Each row has its own sampler (temperature, top-p, a seeded key of its own: the same
seed gives the same text whatever else is in the batch) and its own stop strings; text is handed
out as it is decoded, holding back what could start a stop string.
"""

import queue
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences

from mlx_lora.config import ServeConfig
from mlx_lora.errors import UserError
from mlx_lora.inference.multi_lora import AdapterSlots, RoutedModel, vocab_size
from mlx_lora.model.base import Base
from mlx_lora.model.batch_generator import Argmax, Draw, Generator

PREFILL_BATCH = 8  # prompts read together; more rows than this decode together once read


@dataclass(frozen=True)
class Sampling:
    """What one request asks of generation."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """New text of one request since its last event; the last event has a finish_reason."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # for an error: the HTTP status that fits it


@dataclass(eq=False)
class Job:
    tokens: list[int]
    adapter: str | None  # None: the base
    sampling: Sampling
    emit: Callable[[Event], None]  # called on the worker thread; must not block
    detokenizer: Any = None
    slot: int = 0
    uid: int | None = None
    cancelled: bool = False
    emitted: int = 0  # characters of the text handed out so far
    generated: int = 0
    prompt: Any = None  # a vision-language base's prompt (vision_engine.VisionPrompt); None: `tokens` alone
    prompt_tokens: int = 0  # as usage counts them: `tokens`, or what the processor made of text and images
    hold: int = field(init=False)

    def __post_init__(self):
        self.hold = max((len(s) for s in self.sampling.stop), default=1) - 1
        self.prompt_tokens = self.prompt_tokens or len(self.tokens)


def row_sampler(offset: int, sampling: Sampling) -> Argmax | Draw:
    """logits (1, V) -> the next id (1,), plus `offset` (the row's slot · V, see RoutedModel): a greedy
    row's Argmax, a sampling row's Draw on a key of its own (batch_generator), neither of which needs
    the step's log-softmax."""
    if sampling.temperature == 0:
        return Argmax(offset)
    key = [mx.random.key(random.getrandbits(32) if sampling.seed is None else sampling.seed % 2**32)]

    def uniforms(rows: int) -> mx.array:
        key[0], now = mx.random.split(key[0])
        return mx.random.uniform(shape=(rows,), key=now)

    return Draw(sampling.temperature, sampling.top_p, offset, uniforms)


def first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class BatchEngine:
    """The base with its adapters in slots, and the thread that decodes every request in one batch."""

    def __init__(self, base: Base, max_batch: int = 16, prefill_step: int = ServeConfig.prefill_step):
        self.base = base
        self.adapters = AdapterSlots(base)
        self.vocab = vocab_size(base.model)
        self.model = RoutedModel(base.model, self.adapters.rows, self.vocab)
        self.max_batch = max_batch
        self.prefill_step = prefill_step
        self.peak_mix = 0  # most distinct adapters (base included) decoded in one step
        self.steps = 0  # decoding steps
        self.prefill_steps = 0  # chunks of prompts read
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}  # BatchGenerator uid -> job
        self._generator = self._new_generator()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-lora-batching", daemon=True)
        self._thread.start()

    # --- from any thread -------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.adapters.names)

    @property
    def active(self) -> int:
        return len(self._jobs)

    def submit(self, tokens: list[int], adapter: str | None, sampling: Sampling, emit: Callable[[Event], None]) -> Job:
        job = Job(list(tokens), adapter, sampling, emit, self.base.tokenizer.detokenizer)
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's row (a client that went away); nothing more is emitted for it."""
        job.cancelled = True
        self._inbox.put(("cancel", job))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker between two steps (it may change the model); its result in the Future."""
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
        self._generator.close()

    # --- on the worker ---------------------------------------------------------------------

    def _new_generator(self) -> Generator:
        return Generator(
            self.model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(PREFILL_BATCH, self.max_batch),
            prefill_step_size=self.prefill_step,
        )

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain(block=not self._jobs)
                if self._jobs:
                    self._step()
            except Exception as e:  # the worker outlives any one failure; the requests in flight end
                self._fail_all(f"{type(e).__name__}: {e}")

    def _drain(self, block: bool) -> None:
        """Handle every message waiting; when idle, wait for the first one."""
        try:
            message = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit" and not payload.cancelled:
            try:
                self._insert(payload)
            except Exception as e:  # refused by the generator: this request fails, the worker goes on
                emit_event(payload, Event("", "error", error=f"{type(e).__name__}: {e}", status=400))
        elif kind == "cancel" and payload.uid in self._jobs:
            self._generator.remove([payload.uid])
            del self._jobs[payload.uid]
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn())
            except Exception as e:  # handed to the caller, who turns a UserError into a 4xx
                future.set_exception(e)

    def _insert(self, job: Job) -> None:
        if job.adapter is not None and job.adapter not in self.adapters.names:
            emit_event(job, Event("", "error", error=f"the adapter '{job.adapter}' was removed", status=404))
            return
        job.slot = self.adapters.slot(job.adapter)
        offset = job.slot * self.vocab
        stops = StopSequences([[t + offset] for t in self.base.tokenizer.eos_token_ids])
        (job.uid,) = self._generator.insert(
            [[t + offset for t in job.tokens]],
            max_tokens=[job.sampling.max_tokens],
            samplers=[row_sampler(offset, job.sampling)],
            stop_sequences=[stops],
        )
        self._jobs[job.uid] = job

    def _step(self) -> None:
        """One decoding step and one chunk of the prompts being read (`next`, not `next_generated`,
        which reads every chunk of a prompt before it returns, deaf to cancels in the meantime)."""
        try:
            read, responses = self._generator.next()
        except Exception as e:  # one failed step ends the requests in it, never the server
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            return
        self.prefill_steps += any(not r.end_of_prompt for r in read)  # the rest only moved on to decoding
        self.steps += bool(responses)
        self.peak_mix = max(self.peak_mix, len({self._jobs[r.uid].slot for r in responses if r.uid in self._jobs}))
        unfinished_but_done = []
        for r in responses:
            job = self._jobs.get(r.uid)
            if job is None:
                continue
            token = None if r.finish_reason == "stop" else r.token - job.slot * self.vocab  # "stop": EOS, not text
            if advance(job, token, r.finish_reason):
                del self._jobs[r.uid]
                if r.finish_reason is None:  # a stop string: the generator would go on
                    unfinished_but_done.append(r.uid)
        if unfinished_but_done:
            self._generator.remove(unfinished_but_done)

    def _fail_all(self, message: str) -> None:
        for job in self._jobs.values():
            emit_event(job, Event("", "error", job.prompt_tokens, job.generated, error=message))
        self._jobs.clear()
        self._generator.close()
        self._generator = self._new_generator()

    def _remove(self, name: str) -> None:
        if name not in self.adapters.names:
            raise UserError(f"no adapter named '{name}'; loaded: {', '.join(self.adapters.names) or 'none'}")
        slot = self.adapters.slot(name)
        busy = sum(job.slot == slot for job in self._jobs.values())
        if busy:
            raise UserError(f"the adapter '{name}' is answering {busy} request(s); delete it when they are done")
        self.adapters.remove(name)


def advance(job: Job, token: int | None, finish: str | None) -> bool:
    """Add `token` (None: no text, as EOS) to the job's text, emit what is safe to show; True when the
    job is finished (`finish`, or a stop string)."""
    if token is not None:
        job.detokenizer.add_token(token)
        job.generated += 1
    if finish:
        job.detokenizer.finalize()
    text = job.detokenizer.text
    cut = first_stop(text, job.sampling.stop, job.emitted) if job.sampling.stop else None
    if cut is not None:
        text, finish = text[:cut], "stop"
    end = len(text) if finish else max(job.emitted, len(text) - job.hold)
    if end > job.emitted or finish:
        emit_event(job, Event(text[job.emitted : end], finish, job.prompt_tokens, job.generated))
        job.emitted = end
    return finish is not None


def emit_event(job: Job, event: Event) -> None:
    if not job.cancelled:
        try:
            job.emit(event)
        except Exception:  # a client's callback failing must not stop the worker
            job.cancelled = True
