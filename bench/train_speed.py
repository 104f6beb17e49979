"""Side-by-side training speed: `mlx-lora train` vs `mlx_lm.lora` (vs HF PEFT + torch) on one job.

    python bench/train_speed.py                      # SmolLM-135M shape, 16 rows x 3 epochs, 2 rounds, + PEFT
    python bench/train_speed.py --shape tiny --blas  # also ours with MLX's bundled BLAS

Each run is its own subprocess (`_run` below) on the same random-weight Hugging Face model
(built by transformers) and the same chat data: fp32, LoRA r=8 alpha=16 (mlx-lm scale 2.0) on
q_proj,v_proj of the last 4 blocks, batch 4, rows <= 256 tokens, loss on the assistant turn,
AdamW lr 1e-4 without weight decay, the same number of whole epochs. Both MLX runs use the same
OpenBLAS: mlx-lora loads it itself, mlx_lm gets it through LD_PRELOAD (checked in /proc/self/maps).

tokens/s = every real (non-padding) token of the epoch's rows / seconds, timed from the first
training batch to the adapter being saved. Peak memory: mx.get_peak_memory() at the end of the
run (MLX only) and the process's max RSS (all three). Runs alternate (ours, theirs, ours, ...)
and each number is the median over rounds.
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


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
    config = cls(**spec, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out


def build_data(rows: int, batch_size: int, out: Path) -> Path:
    """Chat rows of 60..256 tokens (the shipped tokenizer is one token per character)."""
    import random

    rng = random.Random(0)

    def text(n):
        s = ""
        while len(s) < n:
            s += rng.choice(WORDS) + " "
        return s[:n].strip()

    def row():
        total = rng.randint(60, 230)  # + 26 tokens of chat template
        answer = rng.randint(10, total // 2)
        return {
            "messages": [
                {"role": "user", "content": text(total - answer)},
                {"role": "assistant", "content": text(answer)},
            ]
        }

    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("valid", batch_size)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    return out


def epoch_tokens(model_dir: Path, data_dir: Path) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [
        len(tok.apply_chat_template(json.loads(l)["messages"], tokenize=True, return_dict=False))
        for l in (data_dir / "train.jsonl").read_text().splitlines()
    ]
    assert max(lengths) <= JOB["max_len"], max(lengths)
    return sum(lengths)


# ---- the runs, each in its own process ------------------------------------------------------


class Clock:
    """Timestamps of every training batch taken from the trainer's iterator."""

    def __init__(self):
        self.fetches: list[float] = []

    def wrap(self, iterator):
        for item in iterator:
            self.fetches.append(time.perf_counter())
            yield item


def _finish(clock: Clock, end: float, out: dict, peak: float | None) -> None:
    out.update(
        fetches=[t - clock.fetches[0] for t in clock.fetches],
        end=end - clock.fetches[0],
        peak_mlx=peak,
        max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_ours(job: dict) -> None:
    import mlx.core as mx

    import mlx_lora  # noqa: F401  (loads OpenBLAS unless MLX_LORA_BLAS=off)
    from mlx_lora.cli import app

    mx.reset_peak_memory = lambda: None  # count from process start, as for mlx_lm
    clock = Clock()
    import mlx_lora.training.loop as train_mod

    name = "iterate_indices" if hasattr(train_mod, "iterate_indices") else "iterate_batches"
    real = getattr(train_mod, name)
    setattr(train_mod, name, lambda *a, **k: clock.wrap(real(*a, **k)))
    args = [
        "train",
        "--model",
        job["model"],
        "--data",
        job["data"],
        "--adapter-path",
        job["adapters"],
        "--targets",
        "q_proj,v_proj",
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
    _finish(clock, end, {"blas": _blas_in_maps()}, mx.get_peak_memory())


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
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
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
            target_modules=["q_proj", "v_proj"],
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


def _blas_in_maps() -> str:
    libs = {l.split()[-1] for l in Path("/proc/self/maps").read_text().splitlines() if "blas" in l.lower()}
    return ", ".join(sorted(Path(l).name for l in libs)) or "none"


# ---- the driver -------------------------------------------------------------------------------


def spawn(who: str, job: dict, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", who, json.dumps(job)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{who} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def epochs_of(res: dict, per_epoch: int, tokens: int) -> list[float]:
    """tokens/s of each epoch, from the batch timestamps."""
    marks = res["fetches"][::per_epoch] + [res["end"]]
    return [tokens / (b - a) for a, b in zip(marks, marks[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="smol")
    p.add_argument("--rows", type=int, default=16, help="training rows (a multiple of the batch size)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating repetitions; medians reported")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True, help="also HF PEFT + torch")
    p.add_argument("--blas", action="store_true", help="also ours with MLX_LORA_BLAS=off (slow above tiny)")
    p.add_argument("--ours-extra", default="", help="extra flags for mlx-lora train, e.g. '--no-prefix-cache'")
    p.add_argument("--work", type=Path, default=None, help="keep model and data here (default: a temp dir)")
    a = p.parse_args()
    if a.rows % JOB["batch_size"]:
        sys.exit(f"--rows must be a multiple of {JOB['batch_size']}")

    import mlx_lora.blas as blas

    openblas = blas._find_openblas()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-"))
    model_dir = work / f"model-{a.shape}"
    if not (model_dir / "config.json").exists():
        build_model(a.shape, model_dir)
    data_dir = build_data(a.rows, JOB["batch_size"], work / f"data-{a.rows}")
    tokens = epoch_tokens(model_dir, data_dir)
    per_epoch = a.rows // JOB["batch_size"]
    base = dict(
        model=str(model_dir),
        data=str(data_dir),
        iters=per_epoch * a.epochs,
        per_epoch=per_epoch,
        threads=a.threads,
        extra=a.ours_extra.split(),
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    envs = {
        "ours": env,
        "theirs": dict(env, LD_PRELOAD=openblas or ""),
        "peft": env,
        "ours, MLX BLAS": dict(env, MLX_LORA_BLAS="off"),
    }
    who_runs = {"ours": "ours", "theirs": "theirs", "peft": "peft", "ours, MLX BLAS": "ours"}
    names = ["ours", "theirs"] + (["peft"] if a.peft else []) + (["ours, MLX BLAS"] if a.blas else [])
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            job = dict(base, adapters=str(work / f"adapters-{n.replace(', ', '-').replace(' ', '')}-{r}"))
            res = spawn(who_runs[n], job, envs[n])
            res["epochs"] = epochs_of(res, per_epoch, tokens)
            res["tps"] = tokens * a.epochs / res["end"]
            results[n].append(res)
            print(
                f"round {r + 1} {n:15s} {res['tps']:8.0f} tok/s  epochs " + " ".join(f"{e:.0f}" for e in res["epochs"]),
                flush=True,
            )
    report(a, results, tokens, openblas)


def report(a, results: dict, tokens: int, openblas) -> None:
    med = lambda n, f: statistics.median(f(r) for r in results[n])
    gb = lambda x: f"{x / 2**30:.3f} GB" if x else "-"
    print(
        f"\n{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {a.threads} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; shape {a.shape}, {a.rows} rows x {a.epochs} epochs, "
        f"{tokens} tokens/epoch, {a.rounds} rounds; OpenBLAS {openblas}"
    )
    print(f"{'':16s}{'tok/s':>9s}{'epoch 1':>9s}{'epoch 2+':>9s}{'peak MLX':>12s}{'max RSS':>12s}  BLAS")
    for n in results:
        print(
            f"{n:16s}{med(n, lambda r: r['tps']):9.0f}{med(n, lambda r: r['epochs'][0]):9.0f}"
            f"{med(n, lambda r: statistics.mean(r['epochs'][1:]) if len(r['epochs']) > 1 else 0):9.0f}"
            f"{gb(med(n, lambda r: r['peak_mlx'] or 0)):>12s}{gb(med(n, lambda r: r['max_rss'])):>12s}"
            f"  {results[n][0]['blas']}"
        )
    ratio = lambda x, y, f: med(x, f) / med(y, f)
    tps, first = (lambda r: r["tps"]), (lambda r: r["epochs"][0])
    for peer in [p for p in ("theirs", "peft") if p in results]:
        label = "mlx_lm" if peer == "theirs" else "PEFT+torch"
        print(
            f"ours / {label}: tokens/s {ratio('ours', peer, tps):.2f}x "
            f"(epoch 1 alone {ratio('ours', peer, first):.2f}x), "
            f"max RSS {ratio('ours', peer, lambda r: r['max_rss']):.2f}x"
            + (f", peak MLX memory {ratio('ours', peer, lambda r: r['peak_mlx']):.2f}x" if peer == "theirs" else "")
        )
    if "ours, MLX BLAS" in results:
        print(f"BLAS gain (ours with OpenBLAS / with MLX's bundled BLAS): {ratio('ours', 'ours, MLX BLAS', tps):.1f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_run":
        {"ours": run_ours, "theirs": run_theirs, "peft": run_peft}[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
