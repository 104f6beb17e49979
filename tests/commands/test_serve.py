"""`mlx-lora serve` against the real openai client: a server process on a free loopback port."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from conftest import CFG_A, CFG_B, generate_alone, save_random_adapter
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig, ServeConfig, build_config, load_yaml
from mlx_lora.errors import UserError

KEY = "sk-test-key"
CFG_C = LoRAConfig(targets="all-linear", num_layers=1, rank=3, alpha=3)
PROMPTS = ["Q: What is 2 + 3?\nA:", "The cat sat on", "Hello world", "One two three four", "Tom has 3 apples"]
MODELS = ("base", "a", "b", "c")
LIMITS = dict(max_tokens=4000, max_prompt_tokens=40, max_body_bytes=20_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.fixture(scope="module")
def served(llama, tmp_path_factory):
    """A server with adapters a, b, c (d waits under the adapter root for run-time loading)."""
    root = tmp_path_factory.mktemp("serve")
    adapters = root / "adapters"
    paths = {
        "a": save_random_adapter(llama, adapters / "a", CFG_A, 1),
        "b": save_random_adapter(llama, adapters / "b", CFG_B, 2),
        "c": save_random_adapter(llama, adapters / "c", CFG_C, 3),
        "d": save_random_adapter(llama, adapters / "d", CFG_A, 4),
        "outside": save_random_adapter(llama, root / "outside", CFG_A, 5),
    }
    (adapters / "link").symlink_to(paths["outside"], target_is_directory=True)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    args = ["--model", str(llama), *[f"--adapter={n}={paths[n]}" for n in "abc"], *flags]
    args += ["--allow-adapter-loading", "--adapter-root", str(adapters)]
    with running_server(args, root) as (url, pid):
        yield {"url": url, "pid": pid, "model": llama, "paths": paths, "root": adapters}


@contextmanager
def running_server(args: list[str], root: Path):
    """`mlx-lora serve ARGS` on a free loopback port, its key from the environment: (url, pid), stopped after."""
    port = free_port()
    command = [sys.executable, "-m", "mlx_lora.cli", "serve", "--port", str(port), *args]
    env = {**os.environ, "MLX_LORA_API_KEY": KEY}  # not --api-key: a process list shows the command line
    with open(root / "server.log", "w") as log:  # the child keeps its own handle
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert process.poll() is None, (root / "server.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the server did not come up: " + (root / "server.log").read_text())
    yield url, process.pid
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the server did not stop within 30 s of SIGTERM")


@pytest.fixture(scope="module")
def expected(served):
    """Greedy text of every (prompt, model) from `mlx-lora generate` with that adapter alone; 8 tokens."""
    paths = served["paths"]
    return {
        (p, m): generate_alone(served["model"], None if m == "base" else paths[m], p, 8)
        for p in PROMPTS
        for m in MODELS
    }


def client(served, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def health(served) -> dict:
    return httpx.get(served["url"] + "/health", timeout=10).json()


def post(served, path: str, body, key=KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served["url"] + path, content=content, headers=headers, timeout=60, **kwargs)


def test_models_health_and_the_api_key(served):
    assert health(served)["status"] == "ok"  # /health needs no key
    assert [m.id for m in client(served).models.list()] == list(MODELS)
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").completions.create(model="a", prompt="hi", max_tokens=2)
    assert KEY.encode() not in Path(f"/proc/{served['pid']}/cmdline").read_bytes()  # the key came from the environment
    models = served["url"] + "/v1/models"
    for scheme in ("bearer", "BEARER", "Bearer "):  # the scheme in any case, RFC 7235 2.1
        assert httpx.get(models, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200, scheme
    for header in (f"Basic {KEY}", f"Bearer {KEY}x", KEY, f"Bearer{KEY}"):
        refused = httpx.get(models, headers={"Authorization": header})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", header


def test_completion_and_chat_whole_and_streamed(served, expected):
    api = client(served)
    prompt = PROMPTS[0]
    whole = api.completions.create(model="a", prompt=prompt, max_tokens=8)
    assert whole.choices[0].text == expected[(prompt, "a")]
    assert whole.usage.completion_tokens <= 8 and whole.choices[0].finish_reason in ("stop", "length")
    streamed = api.completions.create(model="a", prompt=prompt, max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected[(prompt, "a")]

    messages = [{"role": "user", "content": "Say something"}]
    chat_alone = generate_alone(served["model"], served["paths"]["b"], "Say something", 8, chat=True)
    reply = api.chat.completions.create(model="b", messages=messages, max_tokens=8)
    assert reply.choices[0].message.content == chat_alone and reply.choices[0].message.role == "assistant"
    chunks = list(
        api.chat.completions.create(
            model="b", messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_alone
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stop_seed_and_max_completion_tokens_reach_generation(served, expected):
    api = client(served)
    (prompt, model), full = next((k, v) for k, v in expected.items() if len(v) > 4)
    stop = full[2:4]
    cut = api.completions.create(model=model, prompt=prompt, max_tokens=8, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    hot = dict(model="b", prompt=PROMPTS[1], max_tokens=8, temperature=1.5, seed=11)
    assert len({api.completions.create(**hot).choices[0].text for _ in range(3)}) == 1
    messages = [{"role": "user", "content": "Say something"}]
    short = api.chat.completions.create(model="c", messages=messages, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3


async def _ask_all(served, requests: list[tuple[str, str, bool]], concurrency: int) -> list[str]:
    """(prompt, model, stream) each, `concurrency` clients at a time; the texts in order."""
    api = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def ask(prompt: str, model: str, stream: bool) -> str:
        async with gate:
            response = await api.completions.create(model=model, prompt=prompt, max_tokens=8, stream=stream)
            if not stream:
                return response.choices[0].text
            return "".join([chunk.choices[0].text async for chunk in response])

    try:
        return await asyncio.gather(*(ask(*r) for r in requests))
    finally:
        await api.close()


def test_each_request_of_a_mixed_batch_equals_generate_with_its_adapter_alone(served, expected):
    requests = [(p, m, False) for p in PROMPTS[:3] for m in MODELS]
    texts = asyncio.run(_ask_all(served, requests, concurrency=len(requests)))
    assert texts == [expected[(p, m)] for p, m, _ in requests]
    assert len(set(texts)) > 6  # the adapters answer differently
    assert health(served)["peak_mix"] >= 3  # and several shared one decoding step


def test_bad_requests_get_openai_errors_and_others_are_unaffected(served):
    api = client(served)
    cases = [
        (post(served, "/v1/completions", b"{not json"), 400, "invalid_json"),
        (post(served, "/v1/completions", [1, 2]), 400, "invalid_json"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "temperature": "hot"}), 400, "invalid_type"),
        (post(served, "/v1/completions", {"model": "a", "prompt": 5}), 400, "invalid_type"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": True}), 400, "invalid_type"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 4001}), 400, "invalid_value"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "top_p": 0}), 400, "invalid_value"),
        (post(served, "/v1/completions", '{"model": "a", "prompt": "x", "temperature": NaN}'), 400, "invalid_value"),
        (post(served, "/v1/completions", '{"model": "a", "prompt": "x", "top_p": NaN}'), 400, "invalid_value"),
        (
            post(served, "/v1/completions", '{"model": "a", "prompt": "x", "temperature": -Infinity}'),
            400,
            "invalid_value",
        ),
        (
            post(served, "/v1/completions", "[" * 5000 + "]" * 5000),
            400,
            "invalid_json",
        ),  # json recursing past its limit
        (
            post(served, "/v1/chat/completions", '{"model": "a", "messages": %s}' % ("[" * 5000 + "]" * 5000)),
            400,
            "invalid_json",
        ),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "stop": [1]}), 400, "invalid_type"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x", "n": 2}), 400, "invalid_value"),
        (post(served, "/v1/chat/completions", {"model": "a", "messages": "hi"}), 400, "invalid_type"),
        (post(served, "/v1/chat/completions", {"model": "a", "messages": [{"role": "x"}]}), 400, "invalid_value"),
        (post(served, "/v1/completions", {"prompt": "x"}), 400, "invalid_type"),
        (post(served, "/v1/completions", {"model": "zzz", "prompt": "x"}), 404, "model_not_found"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "word " * 100}), 400, "context_length_exceeded"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x" * 30_000}), 413, "body_too_large"),
        (post(served, "/v1/completions", {"model": "a", "prompt": "x"}, key="nope"), 401, "invalid_api_key"),
        (post(served, "/v1/nowhere", {}), 404, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    for name in ("temperature", "top_p"):  # NaN passed every comparison before
        refused = post(served, "/v1/completions", f'{{"model": "a", "prompt": "x", "{name}": NaN}}').json()
        assert refused["error"]["param"] == name and "nan" in refused["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="zzz", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tokens"):
        api.chat.completions.create(model="a", messages=[{"role": "user", "content": "word " * 100}], max_tokens=2)
    assert api.completions.create(model="c", prompt=PROMPTS[1], max_tokens=3).choices[0].text is not None
    assert health(served)["in_flight"] == 0


@pytest.mark.once
def test_a_client_leaving_mid_stream_frees_its_row(served):
    bodies = [{"model": m, "prompt": p, "max_tokens": 300} for p in PROMPTS for m in MODELS]
    finish = lambda body: post(served, "/v1/completions", body).json()["choices"][0]["finish_reason"]
    body = next(b for b in bodies if finish(b) == "length")  # one that runs on without EOS
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        long = {**body, "max_tokens": 4000, "stream": True}
        with http.stream("POST", served["url"] + "/v1/completions", json=long, headers=headers) as response:
            lines = response.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data:")) >= 2
            assert health(served)["in_flight"] == 1
    assert_drained(served)
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a whole (not streamed) answer
        httpx.post(served["url"] + "/v1/completions", json={**body, "max_tokens": 4000}, headers=headers, timeout=1.0)
    assert_drained(served)


def assert_drained(served) -> None:
    """Within seconds nothing is in flight and nothing decodes any more (4000 tokens would take far longer)."""
    deadline = time.time() + 10
    while health(served)["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    steps = health(served)["steps"]
    time.sleep(0.5)
    now = health(served)
    assert now["in_flight"] == 0 and now["open"] == 0 and now["steps"] == steps


def test_adapters_load_and_unload_at_run_time_only_under_the_root(served, expected):
    api = client(served)
    alone_d = generate_alone(served["model"], served["paths"]["d"], PROMPTS[0], 8)
    made = post(served, "/v1/adapters", {"name": "d", "path": "d"})
    assert made.status_code == 201, made.text
    assert api.completions.create(model="d", prompt=PROMPTS[0], max_tokens=8).choices[0].text == alone_d
    assert "d" in [m.id for m in api.models.list()]
    assert post(served, "/v1/adapters", {"name": "d", "path": "a"}).status_code == 409
    refused = [
        {"name": "e", "path": str(served["paths"]["outside"])},
        {"name": "e", "path": "../outside"},
        {"name": "e", "path": "link"},  # a symlink under the root to a directory outside it
    ]
    for body in refused:
        response = post(served, "/v1/adapters", body)
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", body
    assert post(served, "/v1/adapters", {"name": "e", "path": "missing"}).status_code == 404
    assert post(served, "/v1/adapters", {"name": "base", "path": "d"}).status_code == 400
    removed = httpx.delete(served["url"] + "/v1/adapters/d", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="d", prompt=PROMPTS[0], max_tokens=2)
    assert (
        api.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8).choices[0].text
        == expected[(PROMPTS[0], "a")]
    )


def test_load_200_requests_16_clients_none_lost_or_wrong_memory_flat(served, expected):
    """200 requests over base + 3 adapters, half streamed; RSS after within 64 MB of RSS after a warm-up."""
    requests = [(PROMPTS[i % 5], MODELS[(i // 5) % 4], i % 2 == 0) for i in range(200)]
    asyncio.run(_ask_all(served, requests[:32], concurrency=16))  # warm-up: caches, allocator pools
    before = rss_mb(served["pid"])
    start = time.time()
    texts = asyncio.run(_ask_all(served, requests, concurrency=16))
    took = time.time() - start
    after = rss_mb(served["pid"])
    wrong = [(r, t) for r, t in zip(requests, texts) if t != expected[r[:2]]]
    assert len(texts) == 200 and not wrong, wrong[:3]
    assert took < 300, took
    assert after - before < 64, (before, after)
    assert health(served)["in_flight"] == 0 and health(served)["open"] == 0
    print(f"load: 200 requests in {took:.1f}s, server RSS {before:.0f} -> {after:.0f} MB")


def test_loading_off_a_refusing_chat_template_and_a_missing_extra(llama, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from mlx_lora.commands.serve import SERVE_HINT, create_app, serve
    from mlx_lora.inference.batching import BatchEngine
    from mlx_lora.model.base import load_base

    model = tmp_path / "strict"
    shutil.copytree(llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    engine = BatchEngine(load_base(str(model)), max_batch=2)
    try:
        served_app = create_app(engine, ServeConfig(model=str(model), max_requests=2))
        http = TestClient(served_app)
        assert http.post("/v1/adapters", json={"name": "x", "path": "a"}).status_code == 403
        assert http.delete("/v1/adapters/x").status_code == 403
        assert http.get("/v1/models").json()["data"][0]["id"] == "base"  # no key asked: none set
        body = {"model": "base", "messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 2}
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and "user first" in refused.json()["error"]["message"]
        body["messages"][0]["role"] = "user"
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        served_app.state.server.open.update({"one", "two"})  # as if two requests were open
        busy = http.post("/v1/chat/completions", json=body)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
        served_app.state.server.open.clear()
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.get("/health").json()["open"] == 0
    finally:
        engine.close()
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UserError, match="mlx-lora\\[serve\\]"):
        serve(ServeConfig(model=str(llama)))
    assert "pip install" in SERVE_HINT


def test_serve_flags_are_checked_before_anything_loads(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--allow-adapter-loading", "--adapter", "noequals", "--port", "70000"])
    assert result.exit_code == 2
    for words in ("--adapter-root", "NAME=DIR", "--port"):
        assert words in result.output
    result = CliRunner().invoke(
        app, ["serve", "--adapter", "a=x", "--adapter", "a=y", "--adapter-root", "/nonexistent"]
    )
    assert result.exit_code == 2 and "given twice" in result.output and "no such directory" in result.output
    (tmp_path / "serve.yaml").write_text("adapter: [math=runs/math, style=runs/style]\nport: 9000\n")
    cfg = build_config(ServeConfig, load_yaml(tmp_path / "serve.yaml", ServeConfig), {"port": 9001})
    assert cfg.adapter == ["math=runs/math", "style=runs/style"] and cfg.port == 9001 and cfg.host == "127.0.0.1"


class HeldTokenizer:
    """The base's tokenizer with its encode held until released, as a long prompt holds it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.entered, self.released = tokenizer, threading.Event(), threading.Event()
        self.waited_out = False

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, *args, **kwargs):
        self.entered.set()
        self.waited_out = not self.released.wait(30)  # only the old code, encoding on the event loop, waits it out
        return self.tokenizer.encode(*args, **kwargs)


def test_a_512_position_model_its_name_and_a_prompt_held_in_the_tokenizer(tmp_path, monkeypatch):
    """The shipped model reads 512 positions: the default limit. Its id is no adapter's name. A prompt
    being tokenized holds neither /health nor the busy check (which comes first)."""
    from mlx_lora.commands.serve import create_app, start_engine
    from mlx_lora.inference.batching import BatchEngine
    from mlx_lora.model.base import DEFAULT_MODEL, DEFAULT_MODEL_DIR, load_base

    save_random_adapter(DEFAULT_MODEL_DIR, tmp_path / "x", CFG_A, 1)
    engine = BatchEngine(load_base(None), max_batch=2)
    try:
        with pytest.raises(UserError, match="more than mlx-lora-default reads: 512 tokens .max_position_embeddings"):
            create_app(engine, ServeConfig(max_prompt_tokens=513))
        cfg = ServeConfig(allow_adapter_loading=True, adapter_root=str(tmp_path), max_requests=2)
        app = create_app(engine, cfg)
        gate = engine.base.tokenizer = HeldTokenizer(engine.base.tokenizer)
        gate.released.set()
        ask = lambda n: {"model": "base", "prompt": "x" * n, "max_tokens": 1}  # a token a character, and BOS
        with TestClient(app) as http:
            assert http.post("/v1/completions", json=ask(511)).status_code == 200
            gate.entered.clear()
            refused = http.post("/v1/completions", json=ask(4060))  # 4096 tokens were allowed whatever the model
            assert refused.status_code == 400 and "takes 1 to 512" in refused.json()["error"]["message"]
            assert not gate.entered.is_set()  # 4060 characters are more than 512 tokens: refused untokenized
            message = http.post("/v1/completions", json=ask(512)).json()["error"]["message"]
            assert (
                message == "the prompt is 513 tokens; this server takes 1 to 512 (the model's max_position_embeddings)"
            )
            for name in (DEFAULT_MODEL, "base"):
                taken = http.post("/v1/adapters", json={"name": name, "path": "x"})
                assert taken.status_code in (400, 409) and name in taken.json()["error"]["message"], taken.text
            assert http.post("/v1/adapters", json={"name": "y", "path": "x"}).status_code == 201
            gate.entered.clear()
            app.state.server.open.update({"one", "two"})  # as if two requests were open
            busy = http.post("/v1/completions", json=ask(4060))
            assert busy.status_code == 429 and not gate.entered.is_set()  # refused before it was tokenized
            app.state.server.open.clear()
        gate.released.clear()
        during, answer = asyncio.run(health_while_tokenizing(app, gate, ask(20)))
        assert during.json()["status"] == "ok" and not gate.waited_out
        assert answer.status_code == 200, answer.text
    finally:
        engine.close()
    monkeypatch.setenv("MLX_LORA_API_KEY", "from-env")
    assert ServeConfig().key == "from-env" and ServeConfig(api_key="flag").key == "flag"
    with pytest.raises(UserError, match="'mlx-lora-default' is the base model's id"):
        start_engine(ServeConfig(model=DEFAULT_MODEL, adapter=[f"{DEFAULT_MODEL}={tmp_path / 'x'}"]))


async def health_while_tokenizing(app, gate: HeldTokenizer, body: dict):
    """/health asked while the prompt of `body` is held in the tokenizer; (that answer, the request's)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=120) as http:
        asking = asyncio.create_task(http.post("/v1/completions", json=body))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        during = await http.get("/health")
        gate.released.set()
        return during, await asking


def test_the_prompt_limit_comes_from_the_model_config_else_4096():
    from mlx_lora.commands.serve import prompt_limit
    from mlx_lora.model.base import Base

    limit = lambda config, given=None: prompt_limit(
        ServeConfig(max_prompt_tokens=given), Base(None, None, config, Path(), "m")
    )
    assert limit({"max_position_embeddings": 256}) == (256, "the model's max_position_embeddings")
    assert limit({"n_positions": 1024, "vocab_size": 9}) == (1024, "the model's n_positions")  # GPT-2
    assert limit({"text_config": {"max_position_embeddings": 8192}}) == (
        8192,
        "the model's text_config.max_position_embeddings",
    )
    assert limit({"max_position_embeddings": 256}, 100) == (100, "--max-prompt-tokens")
    assert limit({}) == (4096, "no context length in the model's config; --max-prompt-tokens sets one")
    assert limit({}, 9000) == (9000, "--max-prompt-tokens")
    with pytest.raises(UserError, match="more than m reads: 256 tokens"):
        limit({"max_position_embeddings": 256}, 257)


def _string_format_version(d: Path) -> None:
    """format_version "1" in the config and in the copy the weights carry, so the two agree."""
    config = json.loads((d / "adapter_config.json").read_text()) | {"format_version": "1"}
    weights = mx.load(str(d / "adapters.safetensors"))
    metadata = {"format": "mlx-lora", "mlx_lora_config": json.dumps(config)}
    mx.save_safetensors(str(d / "adapters.safetensors"), weights, metadata=metadata)
    (d / "adapter_config.json").write_text(json.dumps(config))


BROKEN = {
    "non-UTF-8": lambda d: (d / "adapter_config.json").write_bytes(b'{"a": "\xff"}'),
    "a list": lambda d: (d / "adapter_config.json").write_bytes(b"[1]"),
    "string format_version": _string_format_version,
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_malformed_adapter_config_is_a_400_not_a_500(served, case):
    name = "broken-" + case.replace(" ", "-")
    shutil.copytree(served["paths"]["d"], served["root"] / name)
    BROKEN[case](served["root"] / name)
    response = post(served, "/v1/adapters", {"name": name, "path": name})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter", response.text
