"""`mlx-lora serve`: the OpenAI HTTP API over one base and many adapters, all decoded in one batch.

The request's `model` picks the adapter by name (or `base`); inference/batching.BatchEngine decodes
every request in flight together, whatever adapter each uses. This module is the HTTP face only:
it checks each request at the boundary (an OpenAI-style error with a 4xx, never a 500 for a bad
request), hands it to the engine and shapes what comes back, whole or as server-sent events.
"""

import asyncio
import hmac
import ipaddress
import json
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.config import API_KEY_ENV, BASE_ID, ServeConfig, parse_adapter_spec
from mlx_lora.data.chat import as_parts
from mlx_lora.data.vision import IMAGE_URL, image_from_url
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import read_adapter
from mlx_lora.inference.batching import BatchEngine, Event, Job, Sampling
from mlx_lora.inference.generation import chat_text
from mlx_lora.inference.vision_engine import VisionEngine, VisionPrompt
from mlx_lora.model.base import Base, context_length, load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels

SERVE_HINT = 'mlx-lora serve needs FastAPI, uvicorn and sse-starlette: pip install "mlx-lora[serve]"'
MAX_STOPS = 4  # as OpenAI allows
ROLES = ("system", "developer", "user", "assistant")
OPEN_ROUTES = ("/health",)  # answered without the API key
KIND_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}
FALLBACK_CONTEXT = 4096  # prompt tokens allowed when the model's config states no context length


class ApiError(Exception):
    """A request the server refuses: the status and the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the request, checked ----------------------------------------------------------------------


async def read_json(request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refused past `limit` bytes before it is all read."""
    length = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", None, "body_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise ApiError(400, "the body is nested too deeply to read", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return data


def typed(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[name] if it has one of `kinds` (a bool is not a number here); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = "number" if float in kinds else KIND_NAMES[kinds[0]]
        raise ApiError(400, f"'{name}' must be a {expected}, got {json.dumps(value)[:40]}", name, "invalid_type")
    return value


def in_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """`value` if it lies in the bounds; NaN (which Python's json reads, and no comparison refuses) never does."""
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", name, "invalid_value")
    return value


def parse_stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None
    if stop is not None and (stops is None or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if stops and len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop", "invalid_value")
    return tuple(stops or ())


def parse_sampling(body: dict, cfg: ServeConfig, chat: bool) -> Sampling:
    """max_tokens (chat: max_completion_tokens too), temperature (default 0: greedy), top_p, seed, stop."""
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = typed(body, key, (int,), cfg.max_tokens)
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise ApiError(
            400, f"'{key}' must be in 1..{cfg.max_tokens} (--max-tokens), got {max_tokens}", key, "invalid_value"
        )
    if typed(body, "n", (int,), 1) != 1:
        raise ApiError(400, "'n' must be 1: each request gets one completion", "n", "invalid_value")
    return Sampling(
        max_tokens=max_tokens,
        temperature=in_range("temperature", typed(body, "temperature", (int, float), 0.0), 0, 2),
        top_p=in_range("top_p", typed(body, "top_p", (int, float), 1.0), 0, 1, low_open=True),
        seed=typed(body, "seed", (int,)),
        stop=parse_stops(body),
    )


def parse_messages(body: dict, vision: bool = False) -> tuple[list[dict], list]:
    """OpenAI messages -> ([{role, content}], the images in order). Content is text (a list of text parts
    is joined); on a vision-language base a user turn may also hold image_url parts (data URLs), and
    every turn is a list of parts, images as placeholders, as `generate --image` and `chat` build them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages", "invalid_type")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a role, one of {', '.join(ROLES)}", where, "invalid_value")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        elif isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == IMAGE_URL for p in content):
            content = image_turn(where, m["role"], content, images, vision)
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be text (a string or text parts)", where, "invalid_type")
        out.append(
            as_parts({"role": m["role"], "content": content}) if vision else {"role": m["role"], "content": content}
        )
    return out, images


def image_turn(where: str, role: str, content: list, images: list, vision: bool) -> list[dict]:
    """A turn's text and image_url parts as template parts, each image decoded from its data URL onto `images`."""
    if not vision:
        raise ApiError(
            400, f"{where}: image_url parts need a vision-language base; this is a text model", where, "unsupported"
        )
    if role != "user":
        raise ApiError(400, f"{where}: only a user turn may hold images", where, "invalid_value")
    parts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        url = part.get(IMAGE_URL) if isinstance(part, dict) and part.get("type") == IMAGE_URL else None
        if not isinstance(url, dict):
            raise ApiError(
                400,
                f'{here} must be a text part or {{"type": "image_url", "image_url": {{"url": "data:..."}}}}',
                here,
                "invalid_type",
            )
        try:
            images.append(image_from_url(here, url.get("url")))
        except UserError as e:
            raise ApiError(400, str(e), here, "invalid_image") from None
        parts.append({"type": "image"})
    return parts


def parse_prompt(body: dict, vocab: int) -> str | list[int]:
    """A completion's prompt: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < vocab for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string, a list of one string, or token ids", "prompt", "invalid_type")


# --- what goes back ----------------------------------------------------------------------------


@dataclass
class Reply:
    """The response's shape: chat.completion or text_completion, whole or as chunks."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.chat else "text_completion"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(event)}

    def whole(self, text: str, event: Event) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": event.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._head(False), "choices": [choice], "usage": usage(event)}


def usage(event: Event) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def sse(data: Any) -> dict[str, str]:
    return {"data": data if isinstance(data, str) else json.dumps(data)}


# --- adapters loaded while serving ---------------------------------------------------------------


def adapter_dir_under(root: str, given: str) -> Path:
    """The adapter directory `given` (relative to `root` or absolute), refused unless it and every
    file in it resolve, symlinks followed, to somewhere under `root`."""
    top = Path(root).resolve()
    try:
        directory = (top / given).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ApiError(404, f"no directory '{given}' under the adapter root", "path", "adapter_not_found") from None
    inside = lambda p: p == top or p.is_relative_to(top)
    if not directory.is_dir() or not inside(directory) or not all(inside(f.resolve()) for f in directory.iterdir()):
        raise ApiError(
            403, f"'{given}' is not a directory under the adapter root (--adapter-root)", "path", "forbidden"
        )
    return directory


# --- the server ----------------------------------------------------------------------------------


def base_ids(model: str | None, base: Base) -> set[str]:
    """The model ids that ask for the base: 'base', --model as given, and the name it loaded as."""
    return {n for n in (BASE_ID, model, base.name) if n}


def prompt_limit(cfg: ServeConfig, base: Base) -> tuple[int, str]:
    """(the most prompt tokens a request may send, where that number comes from): --max-prompt-tokens
    up to the model's context length, which is the default."""
    context = context_length(base.config)
    if cfg.max_prompt_tokens is None:
        if context:
            return context[0], f"the model's {context[1]}"
        return FALLBACK_CONTEXT, "no context length in the model's config; --max-prompt-tokens sets one"
    if context and cfg.max_prompt_tokens > context[0]:
        raise UserError(
            f"--max-prompt-tokens {cfg.max_prompt_tokens} is more than {base.name} reads: {context[0]} tokens"
            f" ({context[1]} in its config); give at most {context[0]}, or leave the option out"
        )
    return cfg.max_prompt_tokens, "--max-prompt-tokens"


def longest_piece(base: Base) -> int:
    """The most characters one token of the vocabulary stands for (its spelling in the vocabulary is
    at least as long: a byte-level piece spells each byte with one character)."""
    return max(len(piece) for piece in base.tokenizer.get_vocab())


class Server:
    """The routes' behaviour over one engine; create_app wires them into FastAPI."""

    def __init__(self, engine: BatchEngine, cfg: ServeConfig):
        self.engine = engine
        self.cfg = cfg
        self.base_ids = base_ids(cfg.model, engine.base)
        self.max_prompt, self.max_prompt_source = prompt_limit(cfg, engine.base)
        self.piece = longest_piece(engine.base)
        self.started = int(time.time())
        self.open: set[Job] = set()  # submitted, not finished or cancelled; touched on the event loop only
        self.admitting = 0  # past the busy check, being tokenized: counted against --max-requests too
        # Tokenizing a long prompt takes a while: off the event loop (so /health and the rest go on),
        # one prompt at a time (a tokenizer object is not safe to share between threads).
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-lora-tokenize")

    def health(self) -> dict[str, Any]:
        """Up, and what the batch is doing: requests in flight, decoding steps, most adapters in one step."""
        engine = self.engine
        return {
            "status": "ok",
            "open": len(self.open),
            "in_flight": engine.active,
            "steps": engine.steps,
            "prefill_steps": engine.prefill_steps,
            "peak_mix": engine.peak_mix,
        }

    def models(self) -> dict[str, Any]:
        card = lambda name, **extra: {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "mlx-lora",
            **extra,
        }
        adapters = [card(name, parent=BASE_ID) for name in self.engine.names]
        return {"object": "list", "data": [card(BASE_ID, root=self.engine.base.name), *adapters]}

    def adapter_of(self, body: dict) -> tuple[str | None, str]:
        """(adapter name or None for the base, the model id to answer with)."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required: the adapter's name, or 'base'", "model", "invalid_type")
        if model in self.base_ids:
            return None, model
        if model in self.engine.names:
            return model, model
        known = ", ".join([BASE_ID, *self.engine.names])
        raise ApiError(404, f"the model '{model}' does not exist; this server has: {known}", "model", "model_not_found")

    def prompt_tokens(self, body: dict, chat: bool) -> tuple[list[int], VisionPrompt | None]:
        """The prompt's tokens, refused past the limit (a text that must be longer is refused untokenized);
        on a vision-language base also the prompt as mlx-vlm reads it (its images' tokens are not counted
        here: the processor adds them)."""
        base = self.engine.base
        vision = base.processor is not None
        images = []
        if chat:
            messages, images = parse_messages(body, vision)
            try:
                prompt = chat_text(base, messages)
            except Exception as e:  # no template, or one that refuses these roles (jinja's raise_exception)
                raise ApiError(
                    400, f"the chat template refuses these messages: {e}", "messages", "unsupported"
                ) from None
        else:
            prompt = parse_prompt(body, self.engine.vocab)
            if vision and not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be text on a vision-language base", "prompt", "invalid_type")
        text = prompt
        if isinstance(prompt, str):
            least = -(-len(prompt) // self.piece)  # no token spells more than `piece` characters
            if least > self.max_prompt:
                raise self.too_long(f"at least {least}", chat)
            prompt = base.tokenizer.encode(prompt, **({"add_special_tokens": False} if chat else {}))
        if not 1 <= len(prompt) <= self.max_prompt:
            raise self.too_long(str(len(prompt)), chat)
        return prompt, VisionPrompt(text, tuple(images)) if vision else None

    def too_long(self, tokens: str, chat: bool) -> ApiError:
        limit, source = self.max_prompt, self.max_prompt_source
        message = f"the prompt is {tokens} tokens; this server takes 1 to {limit} ({source})"
        return ApiError(400, message, "messages" if chat else "prompt", "context_length_exceeded")

    async def complete(self, request, chat: bool):
        from sse_starlette.sse import EventSourceResponse

        body = await read_json(request, self.cfg.max_body_bytes)
        adapter, model = self.adapter_of(body)
        sampling = parse_sampling(body, self.cfg, chat)
        stream = typed(body, "stream", (bool,), False)
        include_usage = typed(body, "stream_options", (dict,), {}).get("include_usage") is True
        if len(self.open) + self.admitting >= self.cfg.max_requests:
            message = f"the server has {len(self.open) + self.admitting} requests open (--max-requests); retry later"
            raise ApiError(429, message, None, "server_busy")
        self.admitting += 1
        try:
            tokens, prompt = await asyncio.get_running_loop().run_in_executor(
                self.tokenizing, self.prompt_tokens, body, chat
            )
        finally:
            self.admitting -= 1
        job, events = self.submit(tokens, adapter, sampling, prompt)
        reply = Reply(chat, model)
        if stream:
            return EventSourceResponse(self.chunks(job, events, reply, include_usage))
        return await self.whole(request, job, events, reply)

    def submit(
        self, tokens: list[int], adapter: str | None, sampling: Sampling, prompt: VisionPrompt | None = None
    ) -> tuple[Job, asyncio.Queue]:
        """Hand the request to the engine (a vision-language base's with its `prompt`); its events arrive
        on the returned queue, on this loop.

        The request counts as open until its last event arrives or it is cancelled, whatever the
        route does meanwhile (a stream whose client left before it started is still counted out).
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        mine: list[Job] = []

        def deliver(event: Event) -> None:  # on the loop's thread
            if event.finish_reason:
                self.open.difference_update(mine)
            events.put_nowait(event)

        emit = lambda e: loop.call_soon_threadsafe(deliver, e)
        extra = {} if prompt is None else {"prompt": prompt}
        job = self.engine.submit(tokens, adapter, sampling, emit, **extra)
        mine.append(job)
        self.open.add(job)
        return job, events

    def cancel(self, job: Job) -> None:
        self.engine.cancel(job)
        self.open.discard(job)

    async def whole(self, request, job: Job, events: asyncio.Queue, reply: Reply) -> dict[str, Any]:
        """Wait for the whole text, looking every second for a client that went away (its row is freed)."""
        parts, next_look = [], time.monotonic() + 1
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + 1
                    if await request.is_disconnected():
                        self.cancel(job)
                        return {}
                if event is None:
                    continue
                parts.append(event.text)
                if event.finish_reason == "error":
                    raise ApiError(event.status, event.error or "generation failed", None, "generation_failed")
                if event.finish_reason:
                    return reply.whole("".join(parts), event)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    async def chunks(self, job: Job, events: asyncio.Queue, reply: Reply, include_usage: bool):
        """Server-sent events as OpenAI streams them; sse-starlette cancels this when the client leaves."""
        try:
            if reply.chat:
                yield sse(reply.chunk(None, None, role=True))
            while True:
                event = await events.get()
                if event.finish_reason == "error":
                    yield sse(ApiError(event.status, event.error or "generation failed").body())
                    return
                if event.text or event.finish_reason:
                    yield sse(reply.chunk(event.text, event.finish_reason))
                if event.finish_reason:
                    if include_usage:
                        yield sse(reply.usage_chunk(event))
                    yield sse("[DONE]")
                    return
        finally:
            self.cancel(job)  # frees the row of a client that left; nothing for a finished job

    async def load_adapter(self, request) -> dict[str, Any]:
        self.check_loading_allowed()
        body = await read_json(request, self.cfg.max_body_bytes)
        name, path = typed(body, "name", (str,)), typed(body, "path", (str,))
        if name is None or path is None:
            raise ApiError(400, "give the adapter's 'name' and its 'path' under the adapter root", "name", "missing")
        try:
            name, _ = parse_adapter_spec(f"{name}=x")
        except ValueError as e:
            raise ApiError(400, str(e).replace("--adapter", "name"), "name", "invalid_value") from None
        if name in self.engine.names:
            raise ApiError(409, f"an adapter named '{name}' is already loaded", "name", "adapter_exists")
        if name in self.base_ids:  # requests for it would reach the base
            raise ApiError(409, f"'{name}' is the base model's id; give the adapter another name", "name", "name_taken")
        directory = adapter_dir_under(self.cfg.adapter_root, path)
        try:
            await asyncio.wrap_future(self.engine.add_adapter(name, directory))
        except UserError as e:
            raise ApiError(400, str(e), "path", "invalid_adapter") from None
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "mlx-lora", "parent": BASE_ID}

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        self.check_loading_allowed()
        if name not in self.engine.names:
            raise ApiError(404, f"no adapter named '{name}'", "name", "model_not_found")
        try:
            await asyncio.wrap_future(self.engine.remove_adapter(name))
        except UserError as e:
            raise ApiError(409, str(e), "name", "adapter_busy") from None
        return {"id": name, "object": "model", "deleted": True}

    def check_loading_allowed(self) -> None:
        if not self.cfg.allow_adapter_loading:
            raise ApiError(
                403, "loading adapters at run time is off; start with --allow-adapter-loading", None, "forbidden"
            )


class RequireKey:
    """`Authorization: Bearer KEY` on every route but /health; the scheme in any case (RFC 7235), the
    key compared in constant time. Plain ASGI rather than @app.middleware: Starlette's
    BaseHTTPMiddleware hides a client's disconnect from the route behind it."""

    def __init__(self, app, key: str | None):
        self.app, self.expected = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if self.expected and scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if not (hmac.compare_digest(given.strip(), self.expected) and scheme.lower() == b"bearer"):
                from fastapi.responses import JSONResponse

                error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key")
                headers = {"WWW-Authenticate": "Bearer"}
                await JSONResponse(error.body(), status_code=401, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: BatchEngine, cfg: ServeConfig):
    """The FastAPI app: OpenAI routes, /health, the API key check and OpenAI-shaped errors."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, cfg)
    app = FastAPI(title="mlx-lora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    as_json = lambda e: JSONResponse(e.body(), status_code=e.status)
    app.add_exception_handler(ApiError, lambda _, e: as_json(e))
    app.add_exception_handler(HTTPException, lambda _, e: as_json(ApiError(e.status_code, str(e.detail))))
    app.add_exception_handler(Exception, lambda _, e: as_json(ApiError(500, f"internal error: {type(e).__name__}")))

    app.add_middleware(RequireKey, key=cfg.key)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.complete(request, chat=True)

    @app.post("/v1/adapters", status_code=201)
    async def load(request: Request):
        return await server.load_adapter(request)

    @app.delete("/v1/adapters/{name}")
    async def remove(name: str):
        return await server.remove_adapter(name)

    return app


def start_engine(cfg: ServeConfig) -> BatchEngine | VisionEngine:
    """The base (--model, else the one the first adapter names) with every --adapter in its slot; a
    vision-language base's engine answers one request at a time (inference/vision_engine.py)."""
    specs = [parse_adapter_spec(spec) for spec in cfg.adapter or []]
    model = cfg.model or (read_adapter(Path(specs[0][1]))[0].base_model if specs else None)
    base = load_base(model, compute=cfg.compute_dtype)
    use_cpu_kernels(base.model, decoding=True)
    clash = sorted(base_ids(cfg.model, base) & {name for name, _ in specs})
    if clash:
        raise UserError(f"--adapter {clash[0]}=...: '{clash[0]}' is the base model's id; give the adapter another name")
    base.model.eval()
    if base.processor is not None:
        engine = VisionEngine(base)
    else:
        engine = BatchEngine(base, max_batch=cfg.max_batch, prefill_step=cfg.prefill_step)
    try:
        for name, path in specs:
            engine.add_adapter(name, Path(path)).result()
    except BaseException:
        engine.close()
        raise
    return engine


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig, log=print) -> None:
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(SERVE_HINT) from None
    engine = start_engine(cfg)
    try:
        app = create_app(engine, cfg)
        server = app.state.server
        names = ", ".join(engine.names) or "none"
        log(f"serving {engine.base.name} as '{BASE_ID}' with adapters: {names}")
        log(f"prompts up to {server.max_prompt} tokens ({server.max_prompt_source})")
        if isinstance(engine, VisionEngine):
            log("a vision-language base: image_url parts (data URLs) read; requests answered one at a time")
        log(f"OpenAI API at http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)")
        if not is_loopback(cfg.host):
            log(
                f"warning: --host {cfg.host} is reachable from other machines"
                + ("" if cfg.key else f"; set {API_KEY_ENV}")
            )
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.close()
