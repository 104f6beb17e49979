"""Make the bundled demo data set: grade-school word problems in GSM8K's answer style.

Each row is {"prompt": "Q: ...\\nA:", "completion": " 3 + 4 = 7. #### 7"}: the working,
then the answer after "####" as GSM8K writes it, so exact match can read the number off the end.
Numbers stay small enough for the ~1M-parameter default model. Seeded, so running it again
rewrites byte-identical files; rows are unique, so the splits share none.

    python data/make_data.py
"""

import json
import random
from pathlib import Path

# (name, pronoun); make_model.py tells stories about the same people and things.
NAMES = [
    ("Tom", "he"),
    ("Ann", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Max", "he"),
    ("Zoe", "she"),
    ("Leo", "he"),
    ("Eva", "she"),
    ("Jack", "he"),
    ("Nora", "she"),
    ("Owen", "he"),
    ("Ruby", "she"),
]
ITEMS = [
    "apples",
    "pens",
    "books",
    "cards",
    "eggs",
    "cookies",
    "marbles",
    "stickers",
    "shells",
    "coins",
    "toys",
    "candies",
    "rocks",
    "flowers",
]
SPLITS = {"train": 2000, "valid": 200, "test": 200}


def add(rng, n, p, m, item):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    q = rng.choice(
        [
            f"{n} has {a} {item} and buys {b} more. How many {item} does {p} have?",
            f"{n} has {a} {item}. {p.capitalize()} finds {b} more. How many {item} does {p} have now?",
            f"{n} has {a} {item} and {m} has {b} {item}. How many {item} do they have in all?",
        ]
    )
    return q, [f"{a} + {b} = {a + b}."], a + b


def subtract(rng, n, p, m, item):
    a = rng.randint(2, 30)
    b = rng.randint(1, a - 1)
    q = rng.choice(
        [
            f"{n} has {a} {item} and gives {b} to {m}. How many {item} does {n} have left?",
            f"{n} had {a} {item}. {p.capitalize()} lost {b} of them. How many {item} are left?",
        ]
    )
    return q, [f"{a} - {b} = {a - b}."], a - b


def multiply(rng, n, p, m, item):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = rng.choice(
        [
            f"{n} has {a} boxes with {b} {item} in each box. How many {item} does {p} have?",
            f"{n} buys {a} bags of {item}. Each bag has {b} {item}. How many {item} does {p} buy?",
        ]
    )
    return q, [f"{a} * {b} = {a * b}."], a * b


def two_step(rng, n, p, m, item):
    a, b = rng.randint(1, 15), rng.randint(1, 15)
    c = rng.randint(1, a + b - 1)
    q = (
        f"{n} has {a} {item}. {p.capitalize()} buys {b} more and then gives {c} to {m}. "
        f"How many {item} does {p} have now?"
    )
    return q, [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c


def row(rng):
    """One problem from a random template, with the working GSM8K puts before the answer."""
    (n, p), (m, _) = rng.sample(NAMES, 2)
    template = rng.choice([add, add, subtract, subtract, multiply, two_step])
    q, steps, answer = template(rng, n, p, m, rng.choice(ITEMS))
    return {"prompt": f"Q: {q}\nA:", "completion": " " + " ".join(steps) + f" #### {answer}"}


def main():
    rng = random.Random(0)
    rows = {}  # prompt -> row: a repeated prompt is dropped, so no row lands in two splits
    while len(rows) < sum(SPLITS.values()):
        r = row(rng)
        rows.setdefault(r["prompt"], r)
    rows = list(rows.values())
    out = Path(__file__).parent
    for split, size in SPLITS.items():
        part, rows = rows[:size], rows[size:]
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"{out / split}.jsonl: {size} rows")


if __name__ == "__main__":
    main()
