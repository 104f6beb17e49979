"""Generated tokens/s of `mlx-lora serve` against `mlx_lm.server`, and of a mixed-adapter batch
against the same requests served one adapter at a time.

    python bench/serve_speed.py --shape tiny --requests 32 --clients 8 --max-tokens 16 --work /tmp/servebench

Builds a random model of --shape (bench/train_speed.py's shapes) and four random adapters in
--work, then, each through its own server process on a free loopback port:
  1. one adapter: the same requests to `mlx-lora serve` and to `mlx_lm.server --adapter-path`
     (the adapter converted to mlx_lm.lora's format);
  2. four adapters: requests round-robin over them, all at once (one mixed batch), against the
     same requests sent adapter by adapter (a server that batches only one adapter at a time).
Tokens/s = completion tokens the servers report / wall time from first request to last answer.
"""

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import SHAPES, WORDS, build_model  # noqa: E402

ADAPTERS = ("a1", "a2", "a3", "a4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model_dir: Path, work: Path) -> dict[str, Path]:
    """Four random adapters of different ranks, ours; a1 also in mlx_lm.lora's format."""
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
    convert(ConvertConfig(str(out["a1"]), str(work / "a1-mlxlm"), to="mlx-lm"), log=lambda _: None)
    return out


def start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
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


async def run(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int) -> tuple[int, float, list]:
    """(completion tokens, seconds, texts) for (model, prompt) requests, `clients` at a time."""
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=600) as http:

        async def one(model: str, prompt: str) -> tuple[int, str]:
            async with gate:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                response = await http.post(url + "/v1/completions", json=body)
                response.raise_for_status()
                answer = response.json()
                return answer["usage"]["completion_tokens"], answer["choices"][0]["text"]

        start = time.perf_counter()
        done = await asyncio.gather(*(one(m, p) for m, p in requests))
        return sum(n for n, _ in done), time.perf_counter() - start, [text for _, text in done]


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(n)]


def measure(url, requests, clients, max_tokens) -> tuple[float, list[str]]:
    """(tokens/s, texts), after a warm-up round."""
    asyncio.run(run(url, requests[: min(8, len(requests))], clients, max_tokens))
    tokens, seconds, texts = asyncio.run(run(url, requests, clients, max_tokens))
    return tokens / seconds, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/servebench"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"model-{args.shape}"
    if not (model / "config.json").exists():
        build_model(args.shape, model)
    adapters = make_adapters(model, args.work)
    texts = prompts(args.requests)
    common = (args.clients, args.max_tokens)
    results = {}

    url = f"http://127.0.0.1:{free_port()}"
    ours = [sys.executable, "-m", "mlx_lora.cli", "serve", "--model", str(model), "--port", url.rsplit(":", 1)[1]]
    ours += [f"--adapter={n}={adapters[n]}" for n in ADAPTERS] + [f"--max-batch={args.clients}"]
    server = start(ours, url, args.work / "ours.log")
    try:
        results["mlx-lora serve, one adapter"], ours_texts = measure(url, [("a1", t) for t in texts], *common)
        mixed = [(ADAPTERS[i % 4], t) for i, t in enumerate(texts)]
        results["mlx-lora serve, 4 adapters mixed"], _ = measure(url, mixed, *common)
        by_adapter = [[r for r in mixed if r[0] == n] for n in ADAPTERS]
        tokens, seconds = 0, 0.0
        for group in by_adapter:
            t, s, _ = asyncio.run(run(url, group, *common))
            tokens, seconds = tokens + t, seconds + s
        results["mlx-lora serve, 4 adapters one at a time"] = tokens / seconds
    finally:
        server.terminate()
        server.wait()

    url = f"http://127.0.0.1:{free_port()}"
    theirs = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", url.rsplit(":", 1)[1]]
    theirs += ["--adapter-path", str(args.work / "a1-mlxlm"), "--max-tokens", str(args.max_tokens)]
    server = start(theirs, url, args.work / "theirs.log")
    try:
        # "default_model" is how mlx_lm.server names the --model it was started with, adapter included
        results["mlx_lm.server, one adapter"], theirs_texts = measure(
            url, [("default_model", t) for t in texts], *common
        )
    finally:
        server.terminate()
        server.wait()

    print(f"shape {args.shape}, {args.requests} requests, {args.clients} clients, max_tokens {args.max_tokens}")
    for name, rate in results.items():
        print(f"{name:45s} {rate:8.1f} tok/s")
    same = sum(a == b for a, b in zip(ours_texts, theirs_texts))
    print(f"greedy text identical to mlx_lm.server's for {same} of {len(texts)} one-adapter requests")


if __name__ == "__main__":
    main()
