"""Answers that stop: the share of held-out chat prompts whose answer ends at the model's
end-of-turn before --max-tokens, for the base and for an adapter trained on chat rows (each
assistant turn's end-of-turn token a target, data/chat.py).

    python bench/stop_rate.py --model SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/stops

The bundled arithmetic rows become one-exchange chat rows ({"messages": [user, assistant]}); the
adapter is trained by `mlx-lora train` on them, then both models answer the first --prompts rows of
data/test.jsonl through the tokenizer's chat template, greedily, as `mlx-lora generate --chat` does.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ANSWER = """
import json, sys
import mlx_lora  # OpenBLAS before mlx.core
from mlx_lora.config import GenerateConfig
from mlx_lora.inference.adapter_set import load_adapters
from mlx_lora.inference.generation import generate
model, adapter, max_tokens, prompts = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), json.loads(sys.argv[4])
cfg = GenerateConfig(model=model, adapter_path=[adapter] if adapter else None, max_tokens=max_tokens, chat=True)
base = load_adapters(cfg).base
for prompt in prompts:
    text, last = "", None
    for last in generate(base, GenerateConfig(**{**cfg.__dict__, "prompt": prompt})):
        text += last.text
    print("RESULT " + json.dumps(dict(stopped=last.finish_reason == "stop", tokens=last.generation_tokens, text=text)))
"""


def chat_rows(src: Path, dst: Path) -> None:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    messages = lambda r: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    dst.write_text("".join(json.dumps({"messages": messages(r)}) + "\n" for r in rows))


def answers(model: str, adapter: str, max_tokens: int, prompts: list[str]) -> list[dict]:
    args = [sys.executable, "-c", ANSWER, model, adapter, str(max_tokens), json.dumps(prompts)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args()
    data = args.work / "chat"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        chat_rows(ROOT / "data" / f"{split}.jsonl", data / f"{split}.jsonl")
    adapter = args.work / "adapter"
    train = ["train", "--model", args.model, "--data", str(data), "--adapter-path", str(adapter)]
    train += ["--num-layers", "8", "--learning-rate", "2e-4", "--iters", str(args.iters), "--val-batches", "5"]
    subprocess.run([sys.executable, "-m", "mlx_lora.cli", *train], check=True, cwd=ROOT)
    test = [json.loads(line) for line in (ROOT / "data" / "test.jsonl").read_text().splitlines()][: args.prompts]
    prompts = [r["prompt"] for r in test]
    head = f"{args.prompts} held-out chat prompts, --max-tokens {args.max_tokens}"
    print(f"| {head} | ends at end-of-turn | mean tokens |")
    print("|---|---:|---:|")
    for name, path in (("base", ""), ("adapter (chat rows)", str(adapter))):
        got = answers(args.model, path, args.max_tokens, prompts)
        stopped = sum(a["stopped"] for a in got)
        mean = sum(a["tokens"] for a in got) / len(got)
        print(f"| {name} | {stopped}/{len(got)} ({100 * stopped / len(got):.0f}%) | {mean:.1f} |")
        print(f"  first answer: {got[0]['text']!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
