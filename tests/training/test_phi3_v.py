"""Phi-3-vision (`phi3_v`) through mlx-vlm: the seed's recipe (LoRA r=16, alpha 16 on the last block's
self_attn.qkv_proj) trains on image rows; a row's tokens, pixels, merged embeddings and logits are
those of mlx-vlm's own processor and model; generate --image, fuse and the PEFT export.

transformers has no Phi-3-vision class (the Hub's is remote code), so mlx-vlm is the other side here.
Its tower is mlx-vlm's fixed CLIP ViT-L/14-336 (303M parameters), about 8 s an image on OpenBLAS on a
2-core CPU: .ci/run leaves this file out of its pass on MLX's reference BLAS, where an image takes minutes.
"""

import json
from functools import partial
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import fp32_tol, write_jsonl, write_shapes
from PIL import Image
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.evaluate import generation_items
from mlx_lora.config import GenerateConfig
from mlx_lora.data.batches import collate
from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_rows, pixel_inputs
from mlx_lora.formats.loader import load_for_inference, read_adapter
from mlx_lora.inference.generation import chat_text, generate
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import LoRALinear
from mlx_lora.model.vision import LAYOUTS, template_messages
from mlx_lora.training.vision import VisionFeed

RECIPE = ["--targets", "self_attn.qkv_proj", "--num-layers", "1", "--rank", "16", "--alpha", "16"]  # the seed's
QUESTION = "What colour is the square?"
TEXT_ROW = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
QKV = "model.layers.1.self_attn.qkv_proj"  # the last of the 2 blocks
# tensor names of microsoft/Phi-3-vision-128k-instruct's checkpoint (its model.safetensors.index.json), one
# of each kind: the language model's, the CLIP tower's, the projector's and the learned separators
HUB_NAMES = {
    "model.embed_tokens.weight",
    "model.layers.1.self_attn.qkv_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.gate_up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight",
    "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23.self_attn.q_proj.weight",
    "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23.mlp.fc2.weight",
    "model.vision_embed_tokens.img_projection.0.weight",
    "model.vision_embed_tokens.img_projection.2.weight",
    "model.vision_embed_tokens.glb_GN",
    "model.vision_embed_tokens.sub_GN",
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """One image row to train on; a text row to validate on (so the tower runs for the steps alone)."""
    out = write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 1}, size=56)
    write_jsonl(out / "valid.jsonl", [TEXT_ROW])
    return out


@pytest.fixture(scope="module")
def trained(phi3_v, shapes, tmp_path_factory):
    """The seed's recipe, its flags verbatim, two steps on the one image row."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    args = ["train", "--model", str(phi3_v), *RECIPE, "--data", str(shapes), "--adapter-path", str(out)]
    result = CliRunner().invoke(app, [*args, "--iters", "2", "--batch-size", "1", "--report-every", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_the_seeds_recipe_trains_the_last_blocks_qkv_proj_at_rank_16(trained):
    weights = {k: np.array(v) for k, v in mx.load(str(trained / "adapters.safetensors")).items()}
    # exactly the last block's fused q/k/v projection: 64 in, 3 x 64 out (4 heads of 16, as many kv heads)
    assert {k: v.shape for k, v in weights.items()} == {f"{QKV}.lora_a": (64, 16), f"{QKV}.lora_b": (16, 192)}
    config, _ = read_adapter(trained)
    assert config.modules == [QKV] and config.lora.scale_of(QKV) == 16 / 16
    assert np.abs(weights[f"{QKV}.lora_b"]).max() > 0  # moved from its zero start
    losses = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in losses if m["loss"] is not None]
    assert len(train) == 2 and train[1] < train[0]  # the same row, after one step on it


@pytest.fixture(scope="module")
def ours_and_theirs(phi3_v, shapes):
    """Our training row (its one image, QUESTION and the answer); the same conversation as mlx-vlm's
    own processor makes it from the text in Phi-3-vision's prompt format, and its model's merged
    embeddings and logits on it, computed as mlx-vlm's generation computes them."""
    from mlx_vlm import load
    from mlx_vlm.utils import prepare_inputs

    base = load_base(str(phi3_v))
    spell = LAYOUTS["phi3_v"]
    path = shapes / "train.jsonl"
    [ex] = encode_vision_rows(
        str(path), file_rows(path), base.tokenizer, base.processor, spell.image_token, 512, as_text=spell.as_text
    )
    answer = json.loads(path.read_text())["messages"][1]["content"]
    text = f"<|user|>\n<|image_1|>\n{QUESTION}<|end|>\n<|assistant|>\n{answer}<|end|>\n"
    model, processor = load(str(phi3_v))
    x = prepare_inputs(processor, images=[Image.open(ex.images[0]).convert("RGB")], prompts=[text])
    embeds = model.get_input_embeddings(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"]).inputs_embeds
    logits = model.language_model(x["input_ids"], inputs_embeds=embeds).logits
    theirs = SimpleNamespace(inputs=x, embeds=np.array(embeds), logits=np.array(logits))
    return SimpleNamespace(base=base, ex=ex, answer=answer), theirs


def test_a_row_and_its_logits_are_mlx_vlms_own(ours_and_theirs):
    ours, theirs = ours_and_theirs
    base, ex, x = ours.base, ours.ex, theirs.inputs
    ids = np.array(x["input_ids"])[0]
    assert np.array_equal(ex.tokens, ids)  # its image as 313 tokens of -1: (1 tile + the whole) x 144 + 1 + 2 x 12
    assert (ids == -1).sum() == 313 and ids[0] == base.tokenizer.bos_token_id
    assert base.tokenizer.decode(ex.tokens[ex.mask].tolist()) == f"{ours.answer}<|end|>\n"  # the reply alone trains
    pixels = pixel_inputs(base.processor, list(ex.images))
    assert all(np.array_equal(pixels[k], np.array(x[k])) for k in ("pixel_values", "image_sizes"))
    feed = VisionFeed(base.model, base.processor)
    tokens, embeds, positions, mask = feed.inputs([ex], [0], collate([ex], [0]))
    n = len(ids) - 1  # the batch is padded past the row's end
    # the same tower on the same pixels in the same shapes: the very same features
    assert np.array_equal(np.array(embeds)[:, :n], theirs.embeds[:, :n])
    got = np.array(base.model.language_model(tokens[:, :-1], embeds, position_ids=positions).logits)[:, :n]
    want = theirs.logits[:, :n]
    # fp32 over other sequence lengths: n·EPS of the logits' size, n the 2 blocks' 128-wide MLP sums
    assert np.abs(got - want).max() <= fp32_tol(2 * 128) * np.abs(want).max()


def test_generate_with_an_image_reads_mlx_vlms_prompt_and_picks_its_greedy_token(phi3_v, ours_and_theirs):
    ours, theirs = ours_and_theirs
    base = ours.base  # the base alone, which the feed left as it was
    cfg = GenerateConfig(model=str(phi3_v), prompt=QUESTION, image=[str(ours.ex.images[0])], max_tokens=2)
    responses = list(generate(base, cfg))
    prompt = int(np.argmax(ours.ex.mask))  # the tokens before the reply: the conversation up to the generation prompt
    assert responses[0].prompt_tokens == prompt
    # mlx-vlm's logits at the prompt's end (its own forward): the token taken is a largest one
    last = theirs.logits[0, prompt - 1]
    assert last[responses[0].token] >= last.max() - fp32_tol(2 * 128) * np.abs(last).max()


def test_eval_and_chat_ask_with_the_model_cards_prompt(phi3_v, shapes):
    """eval's exact-match prompt for an image row, and the chat/generate/serve prompt of a turn holding
    an image, write it as a numbered tag (the template reads string contents only)."""
    base = load_base(str(phi3_v), lazy=True)
    vision, as_text = True, partial(template_messages, base.config)
    [item] = generation_items(list(file_rows(shapes / "train.jsonl")), base.tokenizer, "exact-match", vision, as_text)
    prompt = f"<|user|>\n<|image_1|>\n{QUESTION}<|end|>\n<|assistant|>\n"
    assert item.prompt == prompt and item.images == (shapes / "imgs" / "0000.png",)
    turn = [{"type": "image"}, {"type": "text", "text": QUESTION}, {"type": "image"}]
    assert chat_text(base, [{"role": "user", "content": turn}]) == prompt.replace("<|end|>", "<|image_2|>\n<|end|>")


def test_the_peft_export_names_the_hub_checkpoints_modules_and_reads_back(phi3_v, trained, tmp_path):
    from mlx_lora.formats.peft import checkpoint_names

    assert checkpoint_names(phi3_v) >= HUB_NAMES  # the maker's checkpoint is at the Hub's layout
    out = tmp_path / "peft"
    result = CliRunner().invoke(app, ["convert", str(trained), str(out), "--to", "peft"])
    assert result.exit_code == 0, result.output
    keys = set(mx.load(str(out / "adapter_model.safetensors")))
    # PEFT's prefix on the module paths of the Hub's Phi3VForCausalLM, which are its checkpoint's names
    assert keys == {f"base_model.model.{QKV}.lora_A.weight", f"base_model.model.{QKV}.lora_B.weight"}
    assert {k.removeprefix("base_model.model.").rsplit(".", 2)[0] + ".weight" for k in keys} <= HUB_NAMES
    base = load_for_inference(str(phi3_v), str(out))
    layer = base.model.model.layers[1].self_attn.qkv_proj
    ours = mx.load(str(trained / "adapters.safetensors"))
    assert isinstance(layer, LoRALinear) and np.array_equal(np.array(layer.lora_b), np.array(ours[f"{QKV}.lora_b"]))
    assert np.array_equal(np.array(layer.lora_a), np.array(ours[f"{QKV}.lora_a"]))


def test_fuse_merges_the_adapter_into_the_hub_named_weight(phi3_v, trained, tmp_path):
    """fuse's own check compared the fused model's logits on an image with the adapter's before writing."""
    out = tmp_path / "fused"
    result = CliRunner().invoke(
        app, ["fuse", "--model", str(phi3_v), "--adapter-path", str(trained), "--save-path", str(out)]
    )
    assert result.exit_code == 0 and "check: largest logit difference" in result.output, result.output
    fused, base = mx.load(str(out / "model.safetensors")), mx.load(str(phi3_v / "model.safetensors"))
    assert fused.keys() == base.keys()
    ours = mx.load(str(trained / "adapters.safetensors"))
    delta = (ours[f"{QKV}.lora_a"] @ ours[f"{QKV}.lora_b"]).T  # scale 16/16
    want = np.array(base[f"{QKV}.weight"] + delta)
    assert np.abs(np.array(fused[f"{QKV}.weight"]) - want).max() <= fp32_tol(16) * np.abs(want).max()
    assert all(np.array_equal(np.array(fused[k]), np.array(base[k])) for k in base if k != f"{QKV}.weight")


def test_a_missing_image_is_one_line(phi3_v, shapes, tmp_path):
    write_jsonl(tmp_path / "data" / "valid.jsonl", [TEXT_ROW])
    row = (shapes / "train.jsonl").read_text().replace("imgs/0000.png", str(shapes / "imgs" / "9999.png"))
    (tmp_path / "data" / "train.jsonl").write_text(row)
    args = ["train", "--model", str(phi3_v), *RECIPE, "--data", str(tmp_path / "data"), "--iters", "1"]
    for command in (
        [*args, "--adapter-path", str(tmp_path / "run")],
        ["generate", "--model", str(phi3_v), "--image", str(shapes / "imgs" / "9999.png"), "--prompt", QUESTION],
    ):
        result = CliRunner().invoke(app, command)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert "9999.png: no such file" in errors[0]
    assert not (tmp_path / "run").exists()


def test_an_image_tag_written_into_the_text_is_one_line(phi3_v, shapes, tmp_path):
    row = json.loads((shapes / "train.jsonl").read_text())
    row["messages"][0]["content"][1]["text"] = "<|image_1|> " + QUESTION
    write_jsonl(tmp_path / "data" / "train.jsonl", [row])
    write_jsonl(tmp_path / "data" / "valid.jsonl", [TEXT_ROW])
    args = ["train", "--model", str(phi3_v), *RECIPE, "--data", str(tmp_path / "data"), "--iters", "1"]
    result = CliRunner().invoke(app, [*args, "--adapter-path", str(tmp_path / "run")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "train.jsonl:1: 1 image part(s) but the text holds the image tags" in errors[0]
