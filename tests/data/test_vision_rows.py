"""Rows for a vision-language base: image parts expanded by the model's processor, masks on replies only."""

import json

import numpy as np
import pytest
from conftest import write_jsonl, write_shapes
from PIL import Image

from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_rows
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base

IMAGE_TOKEN = "<|image_pad|>"


@pytest.fixture(scope="module")
def base(qwen2_vl):
    return load_base(str(qwen2_vl), lazy=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 3})


def encode(base, path, limit=512):
    return encode_vision_rows(str(path), file_rows(path), base.tokenizer, base.processor, IMAGE_TOKEN, limit)


def test_an_image_row_is_the_processors_tokens_and_trains_the_reply_alone(base, shapes):
    row = json.loads((shapes / "train.jsonl").read_text().splitlines()[0])
    examples = encode(base, shapes / "train.jsonl")
    ex = examples[0]
    assert ex.images == (shapes / "imgs" / "0000.png",)
    # the tokens are what the model's own processor makes of the whole rendered conversation
    hf = base.processor.tokenizer
    text = hf.apply_chat_template([{**m} for m in row["messages"]], tokenize=False)
    image = Image.open(ex.images[0]).convert("RGB")
    want = np.asarray(base.processor(text=[text], images=[image], add_special_tokens=False)["input_ids"])[0]
    assert ex.tokens.tolist() == want.tolist() and (ex.tokens == hf.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 4
    # trained: the reply and the end of its turn, nothing of the image or the question
    assert hf.decode(ex.tokens[ex.mask]) == row["messages"][1]["content"] + "<|im_end|>\n"


def test_text_rows_in_a_vision_set_encode_as_for_a_text_model(base, tmp_path):
    from mlx_lora.data.examples import encode_row

    rows = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    ex = encode(base, write_jsonl(tmp_path / "train.jsonl", rows))[0]
    want = encode_row("x", base.tokenizer, "chat", rows[0], train_on_prompt=False)
    assert ex.images == () and ex.tokens.tolist() == want.tokens.tolist() and ex.mask.tolist() == want.mask.tolist()


def image_row(image, text="What colour?"):
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": "red"},
        ]
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (image_row("imgs/missing.png"), r"train.jsonl:2: image .*imgs/missing.png: no such file"),
        (image_row("imgs/broken.png"), r"train.jsonl:2: image .*imgs/broken.png: cannot read it"),
        (
            image_row("imgs/0000.png", "look: <|image_pad|>"),
            r"train.jsonl:2: 1 image part\(s\) but the chat template wrote 2 image placeholder",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}]},
            r'train.jsonl:2: messages\[0\].content\[0\] must be \{"type": "text", "text": string\} or',
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "text"}]}]},
            r"train.jsonl:2: messages\[1\]: only a user turn's content may be a list",
        ),
    ],
)
def test_a_bad_image_row_is_one_line_naming_it(base, shapes, tmp_path, row, message):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_text("not a png")
    (tmp_path / "imgs" / "0000.png").write_bytes((shapes / "imgs" / "0000.png").read_bytes())
    good = image_row("imgs/0000.png")
    with pytest.raises(UserError, match=message) as error:
        encode(base, write_jsonl(tmp_path / "train.jsonl", [good, row]))
    assert "\n" not in str(error.value)


def test_a_cut_through_an_image_is_refused(base, shapes):
    with pytest.raises(UserError, match=r"train.jsonl:1: its images end at token \d+, past --max-seq-length 30"):
        encode(base, shapes / "train.jsonl", limit=30)
