"""Make the bundled preference set: the arithmetic questions of data/{train,valid,test}.jsonl as
{"prompt", "chosen", "rejected"} rows for `mlx-lora train --objective dpo` and friends.

chosen is the correct worked answer (" 10 - 9 = 1. #### 1"); rejected is a plausible wrong one,
with the same working but a slip in the last step: the other operation (10 + 9 = 19), or the
right operation with a result off by one to three. Seeded, so running it again rewrites
byte-identical files.

    python data/make_preference.py
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SIZES = {"train": 400, "valid": 50, "test": 50}
LAST_STEP = re.compile(r"(\d+) ([-+*/x]) (\d+) = (\d+)\.(?!.*=)")  # the last "a op b = c." of the working
OTHER = {"+": "-", "-": "+", "*": "+", "x": "+", "/": "*"}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def wrong(completion: str, rng: random.Random) -> str | None:
    """The completion with its last step slipped, its final answer changed to match; None if it has no step."""
    m = LAST_STEP.search(completion)
    if m is None:
        return None
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    slip, result = op, None
    if op in OTHER and OTHER[op] in APPLY and rng.random() < 0.5:
        slip, result = OTHER[op], APPLY[OTHER[op]](a, b)
    if result is None or result < 0 or result == c:
        result = max(0, c + rng.choice([-3, -2, -1, 1, 2, 3]))
        slip = op
    if result == c:
        result = c + 1
    step = f"{a} {slip} {b} = {result}."
    head = completion[: m.start()] + step + completion[m.end() :]
    return re.sub(r"#### -?\d+", f"#### {result}", head)


def make(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for line in (HERE / f"{split}.jsonl").read_text().splitlines():
        row = json.loads(line)
        rejected = wrong(row["completion"], rng)
        if rejected is not None and rejected != row["completion"]:
            rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
        if len(rows) == n:
            break
    return rows


def main() -> None:
    rng = random.Random(0)
    out = HERE / "preference"
    out.mkdir(exist_ok=True)
    for split, n in SIZES.items():
        rows = make(split, n, rng)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
