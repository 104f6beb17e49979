"""Rows for a vision-language base: image parts expanded by the model's processor, masks on replies only."""

import base64
import json

import numpy as np
import pytest
from conftest import write_jsonl, write_shapes
from PIL import Image

from mlx_lora.data.chat import as_parts
from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_row, encode_vision_rows, pixel_inputs
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.stops import stop_ids

IMAGE_TOKEN = "<|image_pad|>"


@pytest.fixture(scope="module")
def base(qwen2_vl):
    return load_base(str(qwen2_vl), lazy=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 3}, size=56)


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


@pytest.mark.parametrize("vlm", ["llava"], indirect=True)
def test_a_llava_row_is_its_processors_tokens_and_trains_the_reply_through_the_stop(vlm, shapes):
    """LLaVA-1.5's template writes "<image>\\n" before the question and closes the reply with </s>: the
    processor expands the placeholder to the image's 16 tokens, and the trained tokens are the reply
    and the token generation stops on."""
    llava = load_base(str(vlm), lazy=True)
    row = json.loads((shapes / "train.jsonl").read_text().splitlines()[0])
    path = shapes / "train.jsonl"
    ex = encode_vision_rows(str(path), file_rows(path), llava.tokenizer, llava.processor, "<image>", 512)[0]
    hf = llava.processor.tokenizer
    text = hf.apply_chat_template([as_parts(m) for m in row["messages"]], tokenize=False)  # it reads parts only
    assert text.startswith("USER: <image>\n") and text.endswith(" ASSISTANT: " + row["messages"][1]["content"] + "</s>")
    image = Image.open(ex.images[0]).convert("RGB")
    want = np.asarray(llava.processor(text=[text], images=[image], add_special_tokens=False)["input_ids"])[0]
    assert ex.tokens.tolist() == want.tolist() and (ex.tokens == hf.convert_tokens_to_ids("<image>")).sum() == 16
    trained = ex.tokens[ex.mask]
    assert hf.decode(trained[:-1]).strip() == row["messages"][1]["content"]
    assert trained[-1] == hf.eos_token_id and stop_ids(llava.tokenizer) == [hf.eos_token_id]


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


@pytest.mark.parametrize("vlm", ["gemma3"], indirect=True)
def test_a_cut_between_gemma3s_start_of_image_and_its_image_tokens_is_refused(vlm, shapes):
    """Gemma 3's placeholder, <start_of_image>, opens its image's run: a cut after it but before the
    run's end is a cut through the image, and a cut at the run's end is not."""
    from mlx_lora.model.vision import LAYOUTS

    base = load_base(str(vlm), lazy=True)
    rows = shapes / "train.jsonl"
    token = LAYOUTS["gemma3"].image_token
    whole = encode_vision_rows(str(rows), file_rows(rows), base.tokenizer, base.processor, token, 512)[0]
    ids = base.processor.tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"])
    start, end = (int(np.flatnonzero(whole.tokens == i)[0]) for i in ids)
    with pytest.raises(
        UserError, match=rf"train.jsonl:1: its images end at token \d+, past --max-seq-length {start + 2}"
    ):
        encode_vision_rows(str(rows), file_rows(rows), base.tokenizer, base.processor, token, start + 2)
    # the run ends after <end_of_image> and its "\n\n" (the processor's expansion of the placeholder)
    row = next(iter(file_rows(rows)))
    ex, _ = encode_vision_row(row.where, row.fields, base.tokenizer, base.processor, token, train_on_prompt=False)
    assert ex.images_end == end + 3 and base.processor.tokenizer.decode(ex.tokens[end + 1 : end + 3]) == "\n\n"


@pytest.mark.parametrize("vlm", ["gemma3"], indirect=True)
def test_gemma3s_image_token_written_into_the_text_is_one_line(vlm, shapes, tmp_path):
    """Gemma 3's processor puts an image's features on <image_soft_token>, not on the template's
    <start_of_image>: a row whose text holds it would give the model more image tokens than features."""
    from mlx_lora.model.vision import LAYOUTS

    base = load_base(str(vlm), lazy=True)
    path = write_jsonl(
        tmp_path / "train.jsonl", [image_row(str(shapes / "imgs" / "0000.png"), "<image_soft_token> What?")]
    )
    with pytest.raises(UserError, match=r"train.jsonl:1: its text holds '<image_soft_token>', the token this model"):
        encode_vision_rows(
            str(path), file_rows(path), base.tokenizer, base.processor, LAYOUTS["gemma3"].image_token, 512
        )


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_url_row(url: str) -> dict:
    row = image_row("unused")
    row["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": url}}
    return row


def test_an_image_url_data_url_reads_the_pixels_of_the_same_image_as_a_file(base, shapes, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0000.png").write_bytes((shapes / "imgs" / "0000.png").read_bytes())
    url = data_url(tmp_path / "imgs" / "0000.png")
    as_file, as_url = encode(
        base, write_jsonl(tmp_path / "train.jsonl", [image_row("imgs/0000.png"), image_url_row(url)])
    )
    assert as_url.images == (url,) and as_file.images == (tmp_path / "imgs" / "0000.png",)
    assert as_url.tokens.tolist() == as_file.tokens.tolist() and as_url.mask.tolist() == as_file.mask.tolist()
    file_pixels, url_pixels = (pixel_inputs(base.processor, list(ex.images)) for ex in (as_file, as_url))
    assert file_pixels.keys() == url_pixels.keys() == {"pixel_values", "image_grid_thw"}
    assert all(np.array_equal(file_pixels[k], url_pixels[k]) for k in file_pixels)


def test_a_prompt_completion_row_with_images_is_generate_images_conversation(base, shapes, tmp_path):
    """Its tokens are the chat row of a user turn holding the images then the prompt, and the
    completion as the reply: trained alone, the images' pixels those of the files."""
    (tmp_path / "imgs").mkdir()
    for name in ("0000.png", "0001.png"):
        (tmp_path / "imgs" / name).write_bytes((shapes / "imgs" / name).read_bytes())
    images = ["imgs/0000.png", "imgs/0001.png"]
    rows = [
        {"prompt": "Which is red?", "completion": "the first", "images": images},
        {"prompt": "Say hi", "completion": "hi", "images": []},
    ]
    two, none = encode(base, write_jsonl(tmp_path / "train.jsonl", rows))
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": "Which is red?"}]
    chat = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "the first"}]}
    want = encode(base, write_jsonl(tmp_path / "chat.jsonl", [chat]))[0]
    assert two.images == tuple(tmp_path / p for p in images) == want.images
    assert two.tokens.tolist() == want.tokens.tolist() and two.mask.tolist() == want.mask.tolist()
    assert base.processor.tokenizer.decode(two.tokens[two.mask]) == "the first<|im_end|>\n"
    pixels = pixel_inputs(base.processor, list(two.images))
    files = base.processor.image_processor(images=[Image.open(tmp_path / p).convert("RGB") for p in images])
    assert all(np.array_equal(pixels[k], np.asarray(files[k])) for k in files)
    # an empty list is the same conversation without images, not the raw prompt and completion
    text = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    assert none.tokens.tolist() == encode(base, write_jsonl(tmp_path / "text.jsonl", [text]))[0].tokens.tolist()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            image_url_row("https://example.com/a.png"),
            r"train.jsonl:2: messages\[0\].content\[0\]: image_url https://example.com/a.png: only data URLs "
            r"\(data:image/png;base64,...\) are read; images are not fetched from the network",
        ),
        (
            image_url_row("data:image/png;base64,bm90IGEgcG5n"),
            r"train.jsonl:2: image_url data:image/png.*: cannot read it",
        ),
        (
            image_url_row("data:image/png,abc"),
            r"train.jsonl:2: image_url data:image/png,abc...: cannot read it \(not a base64",
        ),
        ({"prompt": "p", "completion": "c", "images": "imgs/0000.png"}, r"train.jsonl:2: key 'images' must be a list"),
        (
            {"prompt": "p", "completion": "c", "images": ["imgs/missing.png"]},
            r"train.jsonl:2: image .*imgs/missing.png: no such file",
        ),
        (
            {**image_row("imgs/0000.png"), "images": ["imgs/0000.png"]},
            r"train.jsonl:2: an 'images' list goes with prompt",
        ),
    ],
)
def test_a_bad_image_url_or_images_list_is_one_line_naming_the_row(base, shapes, tmp_path, row, message):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0000.png").write_bytes((shapes / "imgs" / "0000.png").read_bytes())
    first = (
        {"prompt": "p", "completion": "c", "images": ["imgs/0000.png"]}
        if "prompt" in row
        else image_row("imgs/0000.png")
    )
    with pytest.raises(UserError, match=message) as error:
        encode(base, write_jsonl(tmp_path / "train.jsonl", [first, row]))
    assert "\n" not in str(error.value)
