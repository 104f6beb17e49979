"""Side-by-side LoRA training speed on a vision-language model: `mlx-lora train` vs mlx-vlm's own
trainer (`python -m mlx_vlm.train`, its `Trainer`), each in a process of its own, on the same model,
the same rows and images, the same steps.

    python bench/vision_speed.py                         # the tests' random tiny Qwen2-VL, 2 epochs
    python bench/vision_speed.py --model DIR --rows 64 --epochs 3 --batch-size 4

The model is --model (a Hugging Face directory mlx-vlm loads), else the random tiny Qwen2-VL that
tests/conftest.py makes (2 blocks of width 64). The rows are data/make_shapes.py's coloured squares:
ours read its chat rows as written, mlx-vlm the same conversation as {"images": [path], "messages":
[...]}, the form its trainer reads. Both: LoRA r=8 alpha=16 on q_proj,v_proj of every language-model
block, batch --batch-size, AdamW lr 1e-4 without weight decay, no validation, --epochs passes over
the rows (iters = epochs x rows / batch), so both train the same rows, in their own orders. mlx-vlm's
loss covers every token (its completion-only mask looks for Qwen2-VL's real `assistant` token id,
which a random vocabulary lacks); a loss mask changes no step's work.

Reported per system: seconds of its training call (model load, data, steps; a process of its own),
tokens/s = epochs x the rows' tokens (as the model's processor makes them, image tokens included;
the same count for both) / those seconds, MLX peak memory, max RSS; then ours / mlx-vlm's. Both run
on the OpenBLAS mlx-lora finds (mlx-vlm through LD_PRELOAD), as bench/train_speed.py gives mlx_lm.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = dict(rank=8, alpha=16.0, lr=1e-4)


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finish(start: float, out: dict) -> None:
    import mlx.core as mx

    out.update(
        seconds=time.perf_counter() - start,
        peak_mlx=mx.get_peak_memory(),
        max_rss=train_speed.peak_rss(),
        blas=train_speed._blas_in_maps(),
    )
    print("RESULT " + json.dumps(out), flush=True)


def run_ours(job: dict) -> None:
    from mlx_lora.config import TrainConfig
    from mlx_lora.training.loop import train

    cfg = TrainConfig(
        model=job["model"],
        data=job["ours"],
        adapter_path=job["out"],
        iters=job["iters"],
        batch_size=job["batch_size"],
        num_layers=-1,
        targets="q_proj,v_proj",
        rank=LORA["rank"],
        alpha=LORA["alpha"],
        learning_rate=LORA["lr"],
        val_batches=1,
    )
    start = time.perf_counter()
    train(cfg, log=lambda _: None)
    _finish(start, {})


def run_theirs(job: dict) -> None:
    from mlx_vlm import train as mlx_vlm_train

    argv = ["--model", job["model"], "--data", job["theirs"], "--iters", str(job["iters"])]
    argv += ["--batch-size", str(job["batch_size"]), "--learning-rate", str(LORA["lr"])]
    argv += ["--lora-rank", str(LORA["rank"]), "--lora-alpha", str(LORA["alpha"])]
    argv += ["--target-modules", "q_proj", "v_proj", "--adapter-file", str(Path(job["out"]) / "adapters.safetensors")]
    args, settings = mlx_vlm_train.parse_args(argv)
    start = time.perf_counter()
    mlx_vlm_train.run(args, settings)
    _finish(start, {})


def their_rows(ours: Path, out: Path) -> Path:
    """Our chat rows as mlx-vlm's trainer reads them: the image paths in `images`, the text as content."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (ours / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        parts = messages[0]["content"]
        images = [str(ours / p["image"]) for p in parts if p["type"] == "image"]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        rows.append({"images": images, "messages": [{"role": "user", "content": text}, *messages[1:]]})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def row_tokens(model: str, data: Path) -> int:
    """The rows' tokens as our encoder makes them (the processor's image tokens included)."""
    from mlx_lora.data.rows import file_rows
    from mlx_lora.data.vision import encode_vision_rows
    from mlx_lora.model.base import load_base
    from mlx_lora.model.vision import layout

    base = load_base(model)
    token = layout(base.config, "bench").image_token
    path = data / "train.jsonl"
    examples = encode_vision_rows(str(path), file_rows(path), base.tokenizer, base.processor, token, 4096)
    return sum(len(ex.tokens) for ex in examples)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a vision-language model directory (default: the tests' tiny Qwen2-VL)")
    p.add_argument("--rows", type=int, default=32, help="training rows (coloured squares)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if a.rows % a.batch_size:
        sys.exit(f"--rows {a.rows} must be a multiple of --batch-size {a.batch_size}: both trainers see whole epochs")
    work = Path(tempfile.mkdtemp(prefix="vision-speed-"))
    try:
        compare(a, work)
    finally:
        shutil.rmtree(work)


def compare(a: argparse.Namespace, work: Path) -> None:
    if a.model is None:
        a.model = str(_module(ROOT / "tests" / "conftest.py", "conftest").make_qwen2_vl(work / "qwen2_vl"))
    ours = _module(ROOT / "data" / "make_shapes.py", "make_shapes").write_shapes(work / "shapes", {"train": a.rows})
    theirs = their_rows(ours, work / "theirs")
    iters = a.epochs * a.rows // a.batch_size
    tokens = a.epochs * row_tokens(a.model, ours)
    job = dict(model=a.model, ours=str(ours), theirs=str(theirs), iters=iters, batch_size=a.batch_size)
    import mlx_lora.blas as blas

    openblas = blas._find_openblas()  # both on it: mlx-lora loads it, mlx-vlm gets it through LD_PRELOAD
    env = dict(os.environ, EXPECT_OPENBLAS="1") if openblas else dict(os.environ)
    envs = {"ours": env, "mlx-vlm": dict(env, LD_PRELOAD=openblas or "")}
    results = {
        who: train_speed.spawn(who, dict(job, out=str(work / who)), env=envs[who], script=__file__) for who in WHO
    }
    print(f"{a.model}: {a.rows} rows x {a.epochs} epochs, batch {a.batch_size}, {iters} steps, {tokens} tokens")
    for who, r in results.items():
        print(
            f"{who:>8}: {r['seconds']:7.1f} s  {tokens / r['seconds']:8.0f} tok/s  "
            f"peak {r['peak_mlx'] / 2**30:.2f} GB  max RSS {r['max_rss'] / 2**30:.2f} GB"
        )
    ours_r, theirs_r = results["ours"], results["mlx-vlm"]
    print(
        f"ours / mlx-vlm: tokens/s x{theirs_r['seconds'] / ours_r['seconds']:.2f}, "
        f"peak memory x{ours_r['peak_mlx'] / theirs_r['peak_mlx']:.2f}, "
        f"max RSS x{ours_r['max_rss'] / theirs_r['max_rss']:.2f}"
    )


WHO = {"ours": run_ours, "mlx-vlm": run_theirs}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        WHO[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
