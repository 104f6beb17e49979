"""A bfloat16 base on the CPU against the same model stored in float32, side by side in one run:
`mlx-lora train` on each (ours computes the bf16 base in float32, --compute-dtype auto), and
`mlx_lm.lora` on the bf16 base (which computes it in bfloat16); then decoding speed of ours on
each, and ours' peak memory against what `mlx-lora info` predicts.

    python bench/dtype_speed.py                       # the real SmolLM2-135M: 5 steps of batch 4 (theirs 3)
    python bench/dtype_speed.py --shape smol --steps 8 --rounds 3

The models are train_speed.py's (the real one: the Q4_1 GGUF de-quantized to float32 by
transformers), and a bfloat16 copy of the same weights; the training job is train_speed.py's
(LoRA r=8 on q_proj,v_proj of the last 4 blocks, batch 4), each run a command of its own.
Reported: wall time of the whole command and the median time of a step (from the batch
timestamps, the first step left out as it compiles), medians over rounds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import train_speed as ts

GENERATE = """
import json, sys, time
import mlx_lora  # OpenBLAS before mlx.core
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lora.model.base import load_base
base = load_base(sys.argv[1], compute="auto")
for r in stream_generate(base.model, base.tokenizer, "Q: What is 3 + 4?\\nA:", max_tokens=int(sys.argv[2])):
    pass
print("RESULT " + json.dumps(dict(tps=r.generation_tps, tokens=r.generation_tokens)))
"""


def bf16_copy(model_dir: Path, out: Path) -> Path:
    """The same weights stored in bfloat16 (rounded once), as most Hub checkpoints are."""
    import mlx.core as mx

    if not (out / "config.json").exists():
        out.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.suffix != ".safetensors" and f.is_file():
                (out / f.name).write_bytes(f.read_bytes())
        weights = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            weights |= mx.load(str(f))
        mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    return out


def predicted_peak(model: Path, data: Path) -> int:
    """What `mlx-lora info` predicts for ours' run (the in-memory plan, as train_speed's job trains)."""
    from mlx_lora.commands.info import info
    from mlx_lora.config import TrainConfig

    j = ts.JOB
    cfg = TrainConfig(
        model=str(model), data=str(data), targets="q_proj,v_proj", rank=j["rank"], alpha=j["alpha"],
        num_layers=j["layers"], batch_size=j["batch_size"], max_seq_length=j["max_len"],
    )  # fmt: skip
    return info(cfg, log=lambda _: None).plan.in_memory.total


def decode(model: Path, tokens: int) -> float:
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(model), str(tokens)], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"generate failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])["tps"]


def step_seconds(res: dict) -> float:
    """Median time between two batch fetches, the first step (compiling) left out; the last step
    is left out too, as it runs into the final validation and the save."""
    marks = res["fetches"]
    return statistics.median(b - a for a, b in list(zip(marks, marks[1:]))[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=[ts.REAL, *ts.SHAPES], default=ts.REAL)
    p.add_argument("--steps", type=int, default=5, help="steps of ours on each base")
    p.add_argument("--theirs-steps", type=int, default=3, help="steps of mlx_lm.lora (bf16: ~9x slower a step)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--work", type=Path, default=None, help="keep models and data here (default: a temp dir)")
    a = p.parse_args()
    import mlx_lora.blas as blas

    openblas = blas._find_openblas()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    fp32 = work / f"model-{a.shape}"
    if not (fp32 / "config.json").exists():
        ts.build_model(a.shape, fp32)
    bf16 = bf16_copy(fp32, work / f"model-{a.shape}-bf16")
    rows = max(a.steps, a.theirs_steps) * ts.JOB["batch_size"]
    data = ts.build_data(a.shape, rows, ts.JOB["batch_size"], work / f"data-{a.shape}-{rows}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    mlx_env = dict(env, EXPECT_OPENBLAS="1") if openblas else env
    runs = {"ours bf16": ("ours", bf16), "ours fp32": ("ours", fp32), "mlx_lm.lora bf16": ("theirs", bf16)}
    envs = {"ours": mlx_env, "theirs": dict(mlx_env, LD_PRELOAD=openblas or "")}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, (who, model) in runs.items():
            steps = a.steps if who == "ours" else a.theirs_steps
            job = dict(data=str(data), iters=steps, per_epoch=steps, threads=os.cpu_count(), hide_torch=True)
            job |= dict(model=str(model), adapters=str(work / f"adapters-{who}-{model.name}-{r}"), extra=[])
            res = ts.spawn(who, job, envs[who])
            res["step"] = step_seconds(res)
            results[name].append(res)
            res["steps"] = steps
            print(f"round {r + 1} {name:17s} wall {res['wall']:6.1f} s  step {res['step']:.2f} s", flush=True)
    tps = {m.name: statistics.median(decode(m, a.decode_tokens) for _ in range(a.rounds)) for m in (bf16, fp32)}
    predicted = {m.name: predicted_peak(m, data) for m in (bf16, fp32)}
    report(a, results, runs, tps, predicted)


def report(a, results: dict, runs: dict, tps: dict, predicted: dict) -> None:
    cpu = next(
        (l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in l), "?"
    )
    batch = ts.JOB["batch_size"]
    print(f"\n{platform.system()} {platform.machine()}, {cpu}; {a.shape}, batch {batch}, medians of {a.rounds}\n")
    print("| run | steps | whole run | step (median) | decode tok/s | peak memory (MLX) | info predicts |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        model = runs[name][1].name
        mine = runs[name][0] == "ours"
        peak = statistics.median(r["peak_mlx"] for r in res) / 2**30
        cells = [
            str(res[0]["steps"]),
            f"{statistics.median(r['wall'] for r in res):.1f} s",
            f"{statistics.median(r['step'] for r in res):.2f} s",
        ]
        cells += [
            f"{tps[model]:.1f}" if mine else "–",
            f"{peak:.2f} GB",
            f"{predicted[model] / 2**30:.2f} GB" if mine else "–",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
