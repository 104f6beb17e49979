"""Where a preference adapter's greedy answers land on held-out pairs: the chosen side, the
rejected one, or neither. `mlx-lora eval --task preference` scores log-probs; this reads what the
model actually writes.

    python bench/preference_answers.py splits --out /tmp/pa
    mlx-lora eval --model M --adapter-path A --data /tmp/pa/answers --max-tokens 32 --compare-base --output a.json
    mlx-lora eval --model M --adapter-path A --data /tmp/pa/fork --max-tokens 8 --compare-base --output f.json
    python bench/preference_answers.py count a.json f.json

Two prompt/completion splits of data/preference/test.jsonl, the chosen side as the completion:
  answers: the prompt alone; an answer is the number after "####" in the greedy text.
  fork: the prompt plus the text chosen and rejected share, up to the number (or operator) where
        they part; an answer is the first word the model writes there.
"""

import argparse
import json
import re
from pathlib import Path

PAIRS = Path(__file__).resolve().parent.parent / "data" / "preference" / "test.jsonl"


def fork(chosen: str, rejected: str) -> int:
    """Where the two completions part, moved back to the start of the word that differs."""
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    while i > 0 and chosen[i - 1].isdigit():
        i -= 1
    return i - 1 if i > 0 and chosen[i - 1] == " " else i  # the space goes with the next token


def rows() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines()]


def write_splits(out: Path) -> None:
    for name in ("answers", "fork"):
        (out / name).mkdir(parents=True, exist_ok=True)
    with open(out / "answers" / "test.jsonl", "w") as a, open(out / "fork" / "test.jsonl", "w") as f:
        for r in rows():
            a.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n")
            i = fork(r["chosen"], r["rejected"])
            f.write(json.dumps({"prompt": r["prompt"] + r["chosen"][:i], "completion": r["chosen"][i:]}) + "\n")


def final(text: str) -> str | None:
    found = re.search(r"####\s*(-?\d+)", text)
    return found.group(1) if found else None


def first_word(text: str) -> str:
    return (text.split() or [""])[0].rstrip(".")


def count(path: Path, kind: str) -> None:
    """Print, for the base and the adapter, how many answers are the chosen side's, the rejected's, neither."""
    predictions = json.loads(path.read_text())["predictions"]
    for who in ("base", "adapter"):
        tally = {"chosen": 0, "rejected": 0, "neither": 0}
        for r, p in zip(rows(), predictions):
            if kind == "answers":
                said, chosen, rejected = final(p[who]["prediction"]), final(r["chosen"]), final(r["rejected"])
            else:
                i = fork(r["chosen"], r["rejected"])
                said, chosen, rejected = (
                    first_word(t) for t in (p[who]["prediction"], r["chosen"][i:], r["rejected"][i:])
                )
            tally["chosen" if said == chosen else "rejected" if said == rejected else "neither"] += 1
        print(f"{kind:8s} {who:8s} " + ", ".join(f"{k} {v}" for k, v in tally.items()) + f" of {len(predictions)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["splits", "count"])
    p.add_argument("--out", type=Path, default=Path("/tmp/pa"), help="splits: where to write them")
    p.add_argument("outputs", nargs="*", type=Path, help="count: eval --output files, answers then fork")
    a = p.parse_intermixed_args()
    if a.what == "splits":
        write_splits(a.out)
        return
    for path, kind in zip(a.outputs, ("answers", "fork")):
        count(path, kind)


if __name__ == "__main__":
    main()
