"""Make a small image data set for a vision-language model: coloured squares, "What colour is the square?".

Writes DIR/imgs/NNNN.png (a square of one of COLOURS on a light background, at a seeded size and
place, its side half to three quarters of the image's) and DIR/train.jsonl, valid.jsonl,
test.jsonl: chat rows whose user turn holds the image (a path relative to the JSONL file) and the
question, and whose assistant turn is the colour's name. Seeded, so running it again rewrites the
same files. Needs Pillow (mlx-lora[vision] has it).

    python data/make_shapes.py shapes        # then: mlx-lora train --model <a VLM> --data shapes
"""

import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
QUESTION = "What colour is the square?"
SPLITS = {"train": 48, "valid": 8, "test": 8}
SIZE = 112  # pixels a side: 4x4 of Qwen2-VL's 28-pixel merged patches, 16 image tokens
# a square this large covers whole patches wherever it lies, so even a tiny random model's image
# tokens carry its colour (tests/training/test_vision_training.py trains one to name it)


def draw(path: Path, colour: str, rng: random.Random, size: int = SIZE) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 240))
    side = rng.randint(size // 2, 3 * size // 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    ImageDraw.Draw(image).rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
    image.save(path)


def row(image: str, colour: str) -> dict:
    question = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": colour}]}


def write_shapes(out: Path, splits: dict[str, int] = SPLITS, seed: int = 0, size: int = SIZE) -> Path:
    """The images (`size` pixels a side) and the splits' JSONL files under `out`; returns `out`."""
    rng = random.Random(seed)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    number = 0
    for split, count in splits.items():
        rows = []
        for _ in range(count):
            colour = rng.choice(sorted(COLOURS))
            name = f"imgs/{number:04d}.png"
            draw(out / name, colour, rng, size)
            rows.append(row(name, colour))
            number += 1
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


if __name__ == "__main__":
    print(write_shapes(Path(sys.argv[1] if len(sys.argv) > 1 else "shapes")))
