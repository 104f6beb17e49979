"""eval and chat on a vision-language base: image rows and turns read as training and `generate --image` read them."""

import base64
import json

import pytest
from conftest import write_jsonl, write_shapes
from typer.testing import CliRunner

import mlx_lora.commands.chat
from mlx_lora.cli import app
from mlx_lora.commands.evaluate import Item, run
from mlx_lora.config import EvalConfig, GenerateConfig
from mlx_lora.data.batches import collate
from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_rows
from mlx_lora.inference.generation import generate
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.training.vision import VisionFeed

IMAGE_TOKEN = "<|image_pad|>"
QUESTION = "What colour is the square?"
TEXT_ROW = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
EPS = 2.0**-23


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Two image rows and a text-only row in test.jsonl."""
    out = write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 2, "test": 2}, size=56)
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    write_jsonl(out / "test.jsonl", [*rows, TEXT_ROW])
    return out


def generated(model_dir, prompt: str, images: list[str]) -> str:
    """What `generate` (with `--image` for each image) writes for `prompt`, six tokens, greedily."""
    cfg = GenerateConfig(model=str(model_dir), prompt=prompt, image=images, max_tokens=6)
    base = load_base(str(model_dir))
    return base.tokenizer.decode(list(generate(base, cfg))[-1].token_ids)  # mlx-vlm's last response lists them all


def test_eval_answers_an_image_row_and_a_text_row_as_generate_does(qwen2_vl, shapes, monkeypatch):
    monkeypatch.chdir(shapes)  # no ./adapters here: eval scores the base
    cfg = EvalConfig(model=str(qwen2_vl), data=str(shapes), split="test", task="exact-match", max_tokens=6)
    result = run(cfg, log=lambda *_: None)
    assert result["rows"] == 3 and result["base"]["answered"] == 3
    first, _, text = result["predictions"]
    want = generated(qwen2_vl, QUESTION, [str(shapes / "imgs" / "0002.png")])
    item = Item(1, "", [], "a one-line reference", marked=False)  # eval ends such an answer at its line's end
    assert want and first["base"]["prediction"] == item.cut(want)[0]
    assert text["base"]["prediction"] == item.cut(generated(qwen2_vl, "Say hi", []))[0]


def image_rows(image) -> dict:
    """The same question about `image` as a prompt/completion row with `images`, and as a chat row
    whose image is a data URL."""
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {
        "completion": {"prompt": QUESTION, "completion": "red", "images": [str(image)]},
        "data URL": {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "red"}]},
    }


@pytest.mark.parametrize("kind", ["completion", "data URL"])
def test_eval_answers_other_image_rows_as_generate_with_the_file_does(qwen2_vl, shapes, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    image = shapes / "imgs" / "0002.png"
    data = write_jsonl(tmp_path / "data" / "test.jsonl", [image_rows(image)[kind]])
    cfg = EvalConfig(model=str(qwen2_vl), data=str(data.parent), split="test", task="exact-match", max_tokens=6)
    (row,) = run(cfg, log=lambda *_: None)["predictions"]
    want = generated(qwen2_vl, QUESTION, [str(image)])
    assert want and row["base"]["prediction"] == Item(1, "", [], "red", marked=False).cut(want)[0]


def test_eval_loss_on_an_image_row_is_the_training_loss_of_that_row(qwen2_vl, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    row = (shapes / "test.jsonl").read_text().splitlines()[0].replace("imgs/", f"{shapes}/imgs/")
    data = write_jsonl(tmp_path / "data" / "test.jsonl", [json.loads(row)])
    cfg = EvalConfig(model=str(qwen2_vl), data=str(data.parent), split="test", task="loss")
    got = run(cfg, log=lambda *_: None)["base"]["loss"]
    base = load_base(str(qwen2_vl))
    use_cpu_kernels(base.model)  # as eval and training run it
    examples = encode_vision_rows(str(data), file_rows(data), base.tokenizer, base.processor, IMAGE_TOKEN, 2048)
    assert examples[0].images == (shapes / "imgs" / "0002.png",)
    feed = VisionFeed(base.model, base.processor)
    want, _ = feed.loss(base.model, *feed.inputs(examples, [0], collate(examples, [0])))
    # the same computation; eval's token-weighted mean multiplies by the count and divides again
    assert abs(got - want.item()) <= 2 * EPS * want.item()


def test_eval_with_a_missing_image_is_one_line_naming_the_file_and_row(qwen2_vl, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = (shapes / "test.jsonl").read_text().splitlines()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imgs").symlink_to(shapes / "imgs")
    rows[1] = rows[1].replace("imgs/0003.png", "imgs/9999.png")
    (tmp_path / "data" / "test.jsonl").write_text("\n".join(rows) + "\n")
    args = ["eval", "--model", str(qwen2_vl), "--data", str(tmp_path / "data"), "--split", "test"]
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "test.jsonl:2: image " in errors[0] and "imgs/9999.png: no such file" in errors[0]


def test_chat_attaches_an_image_to_the_next_turn_and_answers_as_generate_does(qwen2_vl, shapes, monkeypatch):
    calls = []
    vision_responses = mlx_lora.commands.chat.vision_responses

    def recording(base, text, images, max_tokens, sampler):
        calls.append((text, list(images)))
        return vision_responses(base, text, images, max_tokens, sampler)

    monkeypatch.setattr(mlx_lora.commands.chat, "vision_responses", recording)
    image, missing = str(shapes / "imgs" / "0002.png"), str(shapes / "imgs" / "9999.png")
    script = [f"/image {image}", QUESTION, f"/image {missing}", "/image", "and now?", "/reset", "Say hi", "/quit"]
    args = ["chat", "--model", str(qwen2_vl), "--max-tokens", "6"]
    result = CliRunner().invoke(app, args, input="\n".join(script) + "\n")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    out = result.stdout
    assert f"] you> {image} attached to your next turn\n" in out
    assert f"error: /image {missing}: no such file\n" in out and "error: /image needs a path: /image PATH\n" in out
    first_reply = out.split(f"{image} attached to your next turn\n[base] you> ", 1)[1].split("\n", 1)[0]
    want = "".join(
        r.text for r in generate(load_base(str(qwen2_vl)), GenerateConfig(prompt=QUESTION, image=[image], max_tokens=6))
    )
    assert first_reply == want and want
    # the image stays in the conversation for the next turn; /reset starts without it
    (first, images1), (second, images2), (third, images3) = calls
    assert images1 == images2 == [image] and second.startswith(first) and second.count(IMAGE_TOKEN) == 1
    assert images3 == [] and IMAGE_TOKEN not in third


def test_chat_with_an_image_gone_since_it_was_attached_stops_in_one_line(qwen2_vl, shapes, tmp_path):
    from mlx_lora.commands.chat import chat
    from mlx_lora.config import ChatConfig
    from mlx_lora.errors import UserError

    image = tmp_path / "a.png"
    image.write_bytes((shapes / "imgs" / "0002.png").read_bytes())
    lines = iter([f"/image {image}", QUESTION, "and now?"])

    def read(_prompt):
        line = next(lines)
        if line == "and now?":
            image.unlink()
        return line

    with pytest.raises(UserError, match=rf"^/image {image}: no such file$"):
        chat(ChatConfig(model=str(qwen2_vl), max_tokens=2), read=read, write=lambda *a, **k: None)


# each template's rendering of a system turn "Be brief" and a user turn "Say hi", and of the reply and "and now?"
PARTS_ONLY_TURNS = {
    "idefics3": (
        "<|im_start|>System: Be brief<end_of_utterance>\nUser: Say hi<end_of_utterance>\n",
        "{first} {reply}<end_of_utterance>\nUser: and now?<end_of_utterance>\nAssistant:",
    ),
    "llava": ("Be brief USER: Say hi ASSISTANT:", "{first} {reply}</s>USER: and now? ASSISTANT:"),
}


@pytest.mark.parametrize("vlm", list(PARTS_ONLY_TURNS), indirect=True)
def test_chat_on_a_template_that_reads_only_parts_keeps_every_text_turn(vlm, monkeypatch):
    """SmolVLM's and LLaVA's templates write nothing for a string content: chat gives every turn as
    parts, so a text-only question, the reply and the next question all reach the model."""
    calls = []
    vision_responses = mlx_lora.commands.chat.vision_responses

    def recording(base, text, images, max_tokens, sampler):
        calls.append(text)
        return vision_responses(base, text, images, max_tokens, sampler)

    monkeypatch.setattr(mlx_lora.commands.chat, "vision_responses", recording)
    script = ["Say hi", "and now?", "/quit"]
    result = CliRunner().invoke(
        app, ["chat", "--model", str(vlm), "--max-tokens", "3", "--system", "Be brief"], input="\n".join(script) + "\n"
    )
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    first, second = calls
    opening, then = PARTS_ONLY_TURNS[json.loads((vlm / "config.json").read_text())["model_type"]]
    assert first.startswith(opening)
    reply = result.stdout.split("] you> ", 2)[1].split("\n", 1)[0]
    assert second == then.format(first=first, reply=reply)


@pytest.mark.parametrize("vlm", ["gemma3"], indirect=True)
def test_generate_with_gemma3s_image_token_in_the_prompt_is_one_line(vlm, shapes):
    """mlx-vlm stops on a shape error when a prompt holds <image_soft_token> (Gemma 3's image features'
    token): one line instead."""
    args = [
        "generate",
        "--model",
        str(vlm),
        "--image",
        str(shapes / "imgs" / "0002.png"),
        "--prompt",
        "<image_soft_token>?",
    ]
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    says = "the token this model reads an image's features into; leave it out"
    assert errors == [f"error: the prompt holds '<image_soft_token>', {says}"]
