"""Generated tokens/s of `mlx-lora serve` against `mlx_lm.server`, and of a mixed-adapter batch
against the same requests served one adapter at a time.

    python bench/serve_speed.py --requests 64 --clients 16 --max-tokens 48 --work /tmp/servebench

Takes the real SmolLM2-135M-Instruct (fp32, as bench/train_speed.py makes it; --shape for a random
one) and four random adapters in --work, then, each through its own server process on a free
loopback port:
  1. one adapter: the same requests, --clients at a time, to `mlx-lora serve` and to
     `mlx_lm.server --adapter-path` (the adapter converted to mlx_lm.lora's format);
  2. four adapters: --clients clients, a quarter bound to each adapter, round-robin. Mixed: all of
     them at once, in one batch. One at a time: what a server that holds one adapter at a time
     can do at best, serving each adapter's quarter of the clients in turn with no reload between
     them. And `mlx_lm.server` itself on the mixed requests (each names its adapter's path, so it
     loads that adapter when the one it holds is another).
Tokens/s = completion tokens the servers report / wall time from first request to last answer.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import REAL, SHAPES, WORDS, build_model  # noqa: E402

ADAPTERS = ("a1", "a2", "a3", "a4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model_dir: Path, work: Path) -> dict[str, Path]:
    """Four random adapters of different ranks, ours and in mlx_lm.lora's format (name-mlxlm)."""
    import mlx.core as mx

    from mlx_lora.commands.convert import convert
    from mlx_lora.config import ConvertConfig, LoRAConfig
    from mlx_lora.formats.native import describe, save_adapter
    from mlx_lora.model.base import load_base
    from mlx_lora.model.lora import apply_lora, lora_layers

    out = {}
    for i, name in enumerate(ADAPTERS):
        mx.random.seed(i)
        base = load_base(str(model_dir))
        cfg = LoRAConfig(targets="q_proj,v_proj", num_layers=4, rank=4 * (i + 1), alpha=8.0)
        modules = apply_lora(base.model, cfg)
        for layer in lora_layers(base.model).values():
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
        save_adapter(work / name, base.model, describe(base, cfg, modules))
        out[name] = work / name
        convert(ConvertConfig(str(out[name]), str(work / f"{name}-mlxlm"), to="mlx-lm"), log=lambda _: None)
    return out


@contextmanager
def serving(command: list[str], url: str, log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """The server process, once it answers at `url`; stopped on leaving."""
    process = start(command, url, log, env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait()


def start(command: list[str], url: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"{command[2]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    sys.exit(f"{command[2]} did not come up; see {log}")


async def run(url: str, requests: list[tuple], clients: int, max_tokens: int) -> tuple[int, float, list]:
    """(completion tokens, seconds, texts) for (model, prompt[, extra body]) requests, `clients` at
    a time."""
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=1800) as http:

        async def one(model: str, prompt: str, extra: dict | None = None) -> tuple[int, str]:
            async with gate:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **(extra or {})}
                for attempt in range(5):  # mlx_lm.server's listen backlog drops some of 16 connections at once
                    try:
                        response = await http.post(url + "/v1/completions", json=body)
                        break
                    except httpx.TransportError:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.5)
                response.raise_for_status()
                answer = response.json()
                return answer["usage"]["completion_tokens"], answer["choices"][0]["text"]

        start = time.perf_counter()
        done = await asyncio.gather(*(one(*r) for r in requests))
        return sum(n for n, _ in done), time.perf_counter() - start, [text for _, text in done]


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(n)]


def measure(url, requests, clients, max_tokens) -> tuple[float, list[str]]:
    """(tokens/s, texts), after a warm-up round."""
    asyncio.run(run(url, requests[: min(8, len(requests))], clients, max_tokens))
    tokens, seconds, texts = asyncio.run(run(url, requests, clients, max_tokens))
    return tokens / seconds, texts


def peak_rss_gb(process: subprocess.Popen) -> float:
    """The server's peak resident memory so far (VmHWM), read before it is stopped."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def measure_ours(model: Path, adapters: dict, texts: list[str], args) -> tuple[dict, list[str]]:
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlx_lora.cli", "serve", "--model", str(model), "--port", url.rsplit(":", 1)[1]]
    cmd += [f"--adapter={n}={adapters[n]}" for n in ADAPTERS] + [f"--max-batch={args.clients}"]
    results = {}
    with serving(cmd, url, args.work / "ours.log") as server:
        one, texts_one = measure(url, [("a1", t) for t in texts], args.clients, args.max_tokens)
        results["mlx-lora serve, one adapter"] = one
        mixed = [(ADAPTERS[i % 4], t) for i, t in enumerate(texts)]
        results["mlx-lora serve, 4 adapters mixed"], _ = measure(url, mixed, args.clients, args.max_tokens)
        tokens, seconds = 0, 0.0
        for name in ADAPTERS:  # each adapter's quarter of the clients, in turn
            group = [r for r in mixed if r[0] == name]
            t, s, _ = asyncio.run(run(url, group, max(1, args.clients // 4), args.max_tokens))
            tokens, seconds = tokens + t, seconds + s
        results["mlx-lora serve, 4 adapters one at a time"] = tokens / seconds
        results["mlx-lora serve, peak RSS (GB)"] = peak_rss_gb(server)
    return results, texts_one


def measure_theirs(model: Path, texts: list[str], args) -> tuple[dict, list[str]]:
    """mlx_lm.server, given the OpenBLAS mlx-lora loads (LD_PRELOAD), so both run the same matmuls."""
    from mlx_lora.blas import _find_openblas

    env = dict(os.environ, LD_PRELOAD=_find_openblas() or "")
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", url.rsplit(":", 1)[1]]
    cmd += ["--max-tokens", str(args.max_tokens)]
    results = {}
    with serving(cmd + ["--adapter-path", str(args.work / "a1-mlxlm")], url, args.work / "theirs.log", env) as server:
        # "default_model" is how mlx_lm.server names the --model it was started with, adapter included
        one, texts_one = measure(url, [("default_model", t) for t in texts], args.clients, args.max_tokens)
        results["mlx_lm.server, one adapter"] = one
        results["mlx_lm.server, peak RSS (GB)"] = peak_rss_gb(server)
    if args.skip_mlx_lm_mixed:
        return results, texts_one
    # a request naming the model's path and an adapter: mlx_lm.server loads that pair
    with serving(cmd, url, args.work / "theirs-mixed.log", env):
        paths = [str(args.work / f"{ADAPTERS[i % 4]}-mlxlm") for i in range(len(texts))]
        mixed = [(str(model), t, {"adapters": path}) for t, path in zip(texts, paths)]
        results["mlx_lm.server, 4 adapters mixed"], _ = measure(url, mixed, args.clients, args.max_tokens)
    return results, texts_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=[REAL, *SHAPES], default=REAL)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--skip-mlx-lm-mixed", action="store_true", help="leave out mlx_lm.server on mixed adapters")
    p.add_argument("--work", type=Path, default=Path("/tmp/servebench"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"model-{args.shape}"
    if not (model / "config.json").exists():
        build_model(args.shape, model)
    adapters = make_adapters(model, args.work)
    texts = prompts(args.requests)
    ours, ours_texts = measure_ours(model, adapters, texts, args)
    theirs, theirs_texts = measure_theirs(model, texts, args)
    results = {**ours, **theirs}

    print(f"model {args.shape}, {args.requests} requests, {args.clients} clients, max_tokens {args.max_tokens}")
    for name, value in results.items():
        print(f"{name:45s} {value:8.2f}" + ("" if "RSS" in name else " tok/s"))
    ratio = results["mlx-lora serve, one adapter"] / results["mlx_lm.server, one adapter"]
    print(f"one adapter: mlx-lora serve / mlx_lm.server {ratio:.2f}x")
    mixed = results["mlx-lora serve, 4 adapters mixed"]
    one_at_a_time = results["mlx-lora serve, 4 adapters one at a time"]
    print(f"4 adapters: mixed / one at a time {mixed / one_at_a_time:.2f}x", end="")
    if "mlx_lm.server, 4 adapters mixed" in results:
        print(f", mixed / mlx_lm.server on the same requests {mixed / results['mlx_lm.server, 4 adapters mixed']:.2f}x")
    print()
    texts_file = args.work / "one-adapter-texts.json"
    pairs = [dict(prompt=p, ours=a, theirs=b) for p, a, b in zip(texts, ours_texts, theirs_texts)]
    texts_file.write_text(json.dumps(pairs, indent=1))
    same = sum(a == b for a, b in zip(ours_texts, theirs_texts))
    print(f"greedy text identical to mlx_lm.server's for {same} of {len(texts)} one-adapter requests ({texts_file})")


if __name__ == "__main__":
    main()
