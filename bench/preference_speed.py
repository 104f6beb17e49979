"""Our DPO against mlx-lm-lora's DPO on the same model, rows and settings: seconds per step,
tokens per second and peak memory, side by side.

    python bench/preference_speed.py                       # the shipped model, data/preference, 10 steps
    python bench/preference_speed.py --model DIR --iters 50 --batch-size 8 --rank 16

Both train LoRA (q_proj, v_proj; rank r, scale alpha/r, no dropout) with Adam-family optimizers
at the same learning rate on the rows of --data, rendered with the model's chat template (the
prompt as a user turn, each side as the assistant's reply: mlx-lm-lora's DPODataset; ours reads
the same rows written as conversational preference rows). mlx-lm-lora keeps a second copy of the
model as its reference and runs it on every step; ours computes the reference log-probs once,
with the adapter off, before the first step. Each tool's tok/s is its own count: ours counts
every token of both sides, mlx-lm-lora the masked tokens of both sides. Seconds per step are
measured the same way for both: the training steps only, without loading or validation; ours
also prints the one-off reference pass. The whole run, from loading the model to the last step
(ours: loading, tokenizing, the reference pass, validation, steps and saving; theirs: loading both
copies, building the dataset, its setup and steps), is printed beside them, as wall-clock seconds.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx_lora  # noqa: F401  (OpenBLAS for MLX, which must come before mlx.core; both tools then use it)

# isort: split
import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]


def conversational(src: Path, dst: Path, limit: int | None) -> list[dict]:
    """The first `limit` rows of each split as conversational rows under dst; returns the train rows as text."""
    dst.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "valid"):
        text = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines() if line.strip()][:limit]
        chat = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in text
        ]
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
        rows += text if split == "train" else []
    return rows


def ours(args, data: Path, out: Path) -> dict:
    from mlx_lora.config import TrainConfig
    from mlx_lora.training.loop import train

    marks = {}

    def log(line: str) -> None:
        if line.startswith("step 0/") and "val loss" in line:
            marks["start"] = time.perf_counter()
        elif line.startswith(f"step {args.iters}/{args.iters}  loss"):
            marks["end"] = time.perf_counter()
        elif line.startswith("reference:"):
            marks["reference"] = line

    cfg = TrainConfig(
        model=args.model,
        data=str(data),
        adapter_path=str(out),
        objective="dpo",
        iters=args.iters,
        batch_size=args.batch_size,
        rank=args.rank,
        alpha=args.alpha,
        num_layers=args.num_layers,
        targets="q_proj,v_proj",
        learning_rate=args.learning_rate,
        max_seq_length=args.max_seq_length,
        val_every=0,
        val_batches=1,
        report_every=args.iters,
        save_every=0,
    )
    mx.reset_peak_memory()
    whole = time.perf_counter()
    result = train(cfg, log=log)
    seconds = marks["end"] - marks["start"]
    return {
        "whole s": time.perf_counter() - whole,
        "s/step": seconds / args.iters,
        "tok/s": result.tokens_per_second,
        "peak GB": mx.get_peak_memory() / 2**30,
        "note": marks.get("reference", ""),
    }


def theirs(args, rows: list[dict], out: Path) -> dict:
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.datasets import DPODataset
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    model_dir = args.model or str(ROOT / "mlx_lora" / "default_model")
    whole = time.perf_counter()
    model, tokenizer = load(model_dir)
    reference, _ = load(model_dir)  # mlx-lm-lora's reference: a second copy of the model
    reference.freeze()
    model.freeze()
    num_layers = len(model.layers) if args.num_layers == -1 else args.num_layers
    lora = {"rank": args.rank, "scale": args.alpha / args.rank, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, {**lora, "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    dataset = DPODataset(rows, tokenizer)
    training = DPOTrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        steps_per_report=args.iters,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=args.max_seq_length,
        adapter_file=str(out / "adapters.safetensors"),
        beta=0.1,
    )
    out.mkdir(parents=True, exist_ok=True)
    reported = {}

    class Callback:
        def on_train_loss_report(self, info):
            reported.update(info)

        def on_val_loss_report(self, info):
            pass

    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:  # Linux: no Metal working-set figure to wire
        mx.device_info = lambda: {**info, "max_recommended_working_set_size": 0}
    mx.reset_peak_memory()
    start = time.perf_counter()
    train_dpo(
        model,
        reference,
        optim.Adam(learning_rate=args.learning_rate),
        dataset,
        None,
        training,
        training_callback=Callback(),
    )
    seconds = time.perf_counter() - start
    return {
        "whole s": time.perf_counter() - whole,
        "s/step": seconds / args.iters,
        "tok/s": reported.get("tokens_per_second", float("nan")),
        "peak GB": mx.get_peak_memory() / 2**30,
        "note": "reference model run on every step",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    p.add_argument("--data", default=str(ROOT / "data" / "preference"))
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows of each split")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--max-seq-length", type=int, default=2048)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = conversational(Path(args.data), Path(tmp) / "data", args.rows)
        results = {"mlx-lora": ours(args, Path(tmp) / "data", Path(tmp) / "ours")}
        results["mlx-lm-lora"] = theirs(args, rows, Path(tmp) / "theirs")
    print(f"\nDPO, {args.iters} steps of {args.batch_size} pairs, LoRA r={args.rank} on q_proj,v_proj")
    print(f"{'':12}  {'whole s':>8}  {'s/step':>8}  {'tok/s':>8}  {'peak GB':>8}  note")
    for name, r in results.items():
        print(
            f"{name:12}  {r['whole s']:8.1f}  {r['s/step']:8.3f}  {r['tok/s']:8.0f}  {r['peak GB']:8.3f}  {r['note']}"
        )


if __name__ == "__main__":
    main()
