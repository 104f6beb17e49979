"""LoRA on a vision-language model: the loss transformers computes, an adapter PEFT loads on the
transformers model with our logits, and generation with an image."""

import json
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from conftest import VLM_KINDS, VLM_TERMS, assert_tensors_close, fp32_tol, image_token_id, write_jsonl, write_shapes
from mlx.utils import tree_flatten
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.convert import convert
from mlx_lora.commands.evaluate import run
from mlx_lora.config import ConvertConfig, EvalConfig, GenerateConfig, LoRAConfig, TrainConfig
from mlx_lora.data.batches import collate
from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_rows
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.inference.generation import chat_text, generate
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import apply_lora, lora_layers, outside_language_model
from mlx_lora.model.vision import LAYOUTS, forward
from mlx_lora.training.loop import train
from mlx_lora.training.vision import VisionFeed

QUESTION = "What colour is the square?"
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask")  # what a processor gives for images


def tol(base) -> float:
    """fp32 through other kernels: n·EPS, n the terms of the longest sums (conftest's VLM_TERMS)."""
    return fp32_tol(VLM_TERMS[base.config["model_type"]])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 16, "valid": 4, "test": 2}, size=56)


def train_four_steps(model_dir, shapes, out):
    """Four steps at a large learning rate, so the adapter moves the logits well past rounding."""
    cfg = TrainConfig(
        model=str(model_dir),
        data=str(shapes),
        adapter_path=str(out),
        iters=4,
        batch_size=4,
        num_layers=1,
        targets="q_proj,v_proj",
        rank=4,
        alpha=8,
        learning_rate=5e-2,
    )
    result = train(cfg, log=lambda _: None)
    assert result.val_losses[4] < result.val_losses[0]
    return out


@pytest.fixture(scope="module")
def adapter(qwen2_vl, shapes, tmp_path_factory):
    return train_four_steps(qwen2_vl, shapes, tmp_path_factory.mktemp("run") / "adapter")


@pytest.fixture(scope="module")
def vlm_adapter(vlm, shapes, tmp_path_factory):
    """train_four_steps on each checked architecture (qwen2_vl's is `adapter`)."""
    return train_four_steps(vlm, shapes, tmp_path_factory.mktemp("run") / "adapter")


def hf_model(model_dir):
    """transformers' class of the model (Qwen2VLForConditionalGeneration, ...), as config.json names it."""
    model_class = getattr(transformers, json.loads((model_dir / "config.json").read_text())["architectures"][0])
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_inputs(base, x: dict) -> dict:
    ids = np.asarray(x["input_ids"])
    out = {"input_ids": torch.tensor(ids)} | {k: torch.tensor(np.asarray(x[k])) for k in PIXEL_KEYS if k in x}
    if base.config["model_type"].startswith("qwen"):  # Qwen-VL's: which tokens are the image's, for its 3-D positions
        out["mm_token_type_ids"] = torch.tensor((ids == image_token_id(base.config)).astype(np.int64))
    return out


def prompt_inputs(base, image_path) -> dict:
    """A question about one image as a user turn, ready for the assistant's reply."""
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = base.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    image = Image.open(image_path).convert("RGB")
    return dict(base.processor(text=[text], images=[image], add_special_tokens=False))


def our_logits(base, x: dict) -> np.ndarray:
    """As mlx-vlm's generation computes them (model/vision.forward)."""
    return np.array(forward(base.model, {k: mx.array(np.asarray(x[k])) for k in ("input_ids", *PIXEL_KEYS) if k in x}))


def test_the_loss_of_a_mixed_batch_is_transformers_loss_on_the_assistant_tokens(vlm, shapes, tmp_path):
    """Two image rows and a text row, padded into one batch: the token-weighted mean of transformers'
    loss per row with labels on the trained tokens only (image merge, 3-D positions, masks). Gemma 3's
    with its processor's token_type_ids, with which transformers lets an image's tokens see each other."""
    text = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
    rows = [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()[:2]]
    data = write_jsonl(shapes / "mixed.jsonl", [*rows, text])
    base = load_base(str(vlm))
    use_cpu_kernels(base.model)  # as training runs it
    token = LAYOUTS[base.config["model_type"]].image_token
    examples = encode_vision_rows(str(data), file_rows(data), base.tokenizer, base.processor, token, 512)
    feed = VisionFeed(base.model, base.processor)
    loss, ntoks = feed.loss(base.model, *feed.inputs(examples, [0, 1, 2], collate(examples, [0, 1, 2])))
    hf, total, count, largest = hf_model(vlm), 0.0, 0, 0.0
    for i in range(3):
        ex = examples[i]
        image = [Image.open(ex.images[0]).convert("RGB")] if ex.images else None
        x = {"input_ids": ex.tokens[None]}
        if image:
            x |= base.processor.image_processor(images=image)
        labels = torch.tensor(np.where(ex.mask, ex.tokens, -100)[None].astype(np.int64))
        given = hf_inputs(base, x)
        if base.config["model_type"] == "gemma3":
            given["token_type_ids"] = torch.tensor((ex.tokens[None] == image_token_id(base.config)).astype(np.int64))
        with torch.no_grad():
            out = hf(**given, labels=labels)
        total, count = total + out.loss.item() * ex.mask[1:].sum(), count + int(ex.mask[1:].sum())
        largest = max(largest, out.logits.abs().max().item())
    assert ntoks.item() == count
    # each logit within tol·max|logit| of transformers', so each cross-entropy within twice that
    assert abs(loss.item() - total / count) <= 2 * tol(base) * largest


def test_a_trained_adapter_in_peft_gives_our_logits_on_the_transformers_model(vlm, shapes, vlm_adapter, tmp_path):
    convert(ConvertConfig(str(vlm_adapter), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    peft_model = PeftModel.from_pretrained(hf_model(vlm), tmp_path / "peft").eval()
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    blocks = LAYOUTS[json.loads((vlm / "config.json").read_text())["model_type"]].transformers + "layers"
    assert wrapped == {f"{blocks}.1.self_attn.{p}" for p in ("q_proj", "v_proj")}
    ours = load_for_inference(str(vlm), str(vlm_adapter))
    x = prompt_inputs(ours, shapes / "imgs" / "0016.png")  # a validation image
    with torch.no_grad():
        theirs = peft_model(**hf_inputs(ours, x)).logits.numpy()
    got, bound = our_logits(ours, x), tol(ours) * np.abs(theirs).max()
    assert np.abs(got - theirs).max() <= bound
    # and the adapter matters: it moves the logits by far more than the bound
    assert np.abs(our_logits(load_base(str(vlm)), x) - got).max() > 100 * bound


def assert_greedy_reply(peft_model, ours, image, tokens: list[int]) -> None:
    """Each of `tokens`, which `generate --image` replied, is transformers + PEFT's greedy pick after the
    prompt mlx-vlm built (its tokenizer call adds the test tokenizer's BOS, as `prompt_inputs` does not)
    and the tokens before it. Our logits are within `bound` of theirs, so our pick's logit is within
    2·bound of their largest. A random model may reply with its image placeholder, which transformers
    would count against the image's features: the check ends at the first one (its own pick included)."""
    from mlx_vlm.utils import prepare_inputs

    text = chat_text(ours, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    index = getattr(ours.model.config, "image_token_index", None)
    x = dict(prepare_inputs(ours.processor, images=[str(image)], prompts=[text], image_token_index=index))
    placeholder = image_token_id(ours.config)
    checked = tokens[: tokens.index(placeholder) + 1] if placeholder in tokens else tokens
    ids = np.asarray(x["input_ids"])
    n = ids.shape[1]
    forced = x | {"input_ids": np.concatenate([ids, np.asarray([checked[:-1]], dtype=ids.dtype)], axis=1)}
    with torch.no_grad():
        logits = peft_model(**hf_inputs(ours, forced)).logits[0, n - 1 : n - 1 + len(checked)].numpy()
    bound = tol(ours) * np.abs(logits).max()
    picked = logits[np.arange(len(checked)), checked]
    assert len(checked) >= 1 and (picked >= logits.max(axis=-1) - 2 * bound).all()


def test_generate_with_an_image_is_transformers_greedy_reply(vlm, shapes, vlm_adapter, tmp_path):
    """`generate --image` through the PEFT export read back: each token is the one transformers + PEFT
    pick greedily after the same tokens, up to a random model's near-ties (assert_greedy_reply)."""
    convert(ConvertConfig(str(vlm_adapter), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    image = shapes / "imgs" / "0017.png"
    cfg = GenerateConfig(model=str(vlm), prompt=QUESTION, image=[str(image)], max_tokens=6)
    ours = load_for_inference(str(vlm), str(tmp_path / "peft"))
    tokens = list(generate(ours, cfg))[-1].token_ids  # mlx-vlm's last response lists them all
    peft_model = PeftModel.from_pretrained(hf_model(vlm), tmp_path / "peft").eval()
    assert_greedy_reply(peft_model, ours, image, tokens)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pack"], "--pack: rows holding images are not packed; drop --pack"),
        (["--objective", "dpo"], "--objective dpo: a vision-language model trains with sft only so far"),
    ],
)
def test_what_a_vision_run_does_not_do_is_one_line(qwen2_vl, shapes, tmp_path, extra, message):
    args = ["train", "--model", str(qwen2_vl), "--data", str(shapes), "--adapter-path", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--iters", "1", *extra])
    assert result.exit_code == 2 and f"error: {message}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


def test_a_missing_image_is_one_line_naming_the_row(qwen2_vl, shapes, tmp_path):
    rows = (shapes / "train.jsonl").read_text().splitlines()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imgs").symlink_to(shapes / "imgs")
    broken = rows[2].replace("imgs/0002.png", "imgs/9999.png")
    (tmp_path / "data" / "train.jsonl").write_text("\n".join([rows[0], rows[1], broken]) + "\n")
    args = ["train", "--model", str(qwen2_vl), "--data", str(tmp_path / "data"), "--iters", "1"]
    result = CliRunner().invoke(app, [*args, "--adapter-path", str(tmp_path / "run")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output
    assert "train.jsonl:3: image " in errors[0] and "imgs/9999.png: no such file" in errors[0]


def test_fuse_writes_a_model_mlx_vlm_and_transformers_load_with_our_adapter_logits(vlm, shapes, vlm_adapter, tmp_path):
    """The fused directory loads with mlx_vlm.load and with transformers' class; both give our base +
    adapter logits on an image and a question, and its own processor and chat template make the base's inputs."""
    import mlx_vlm

    out = tmp_path / "fused"
    args = ["fuse", "--model", str(vlm), "--adapter-path", str(vlm_adapter), "--save-path", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ours = load_for_inference(str(vlm), str(vlm_adapter))
    x = prompt_inputs(ours, shapes / "imgs" / "0016.png")  # a validation image
    want = our_logits(ours, x)
    bound = tol(ours) * np.abs(want).max()
    model, _ = mlx_vlm.load(str(out))
    fused_x = prompt_inputs(load_base(str(out)), shapes / "imgs" / "0016.png")  # its processor, as --model reads it
    assert all(np.array_equal(np.asarray(fused_x[k]), np.asarray(x[k])) for k in x)
    assert np.abs(our_logits(SimpleNamespace(model=model), x) - want).max() <= bound
    with torch.no_grad():
        theirs = hf_model(out)(**hf_inputs(ours, x)).logits.numpy()
    assert np.abs(theirs - want).max() <= bound
    # and the merge matters: the fused model is not the base
    assert np.abs(our_logits(load_base(str(vlm)), x) - want).max() > 100 * bound


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--export-gguf"], "--export-gguf: not built for a vision-language model (qwen2_vl)"),
        (["--requantize"], "--requantize: a vision-language model is fused in full precision only"),
    ],
)
def test_fuse_refuses_what_it_does_not_build_for_a_vision_model_in_one_line(qwen2_vl, adapter, tmp_path, flags, says):
    args = ["fuse", "--model", str(qwen2_vl), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, *flags])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: {says}")
    assert not (tmp_path / "out").exists()


def test_fuse_refuses_a_quantized_vision_model_in_one_line(qwen2_vl, adapter, tmp_path):
    """mlx-vlm's own 4-bit conversion of the base: its checkpoint is MLX-quantized, which transformers does not read."""
    from mlx_vlm.convert import convert as mlx_vlm_convert

    mlx_vlm_convert(str(qwen2_vl), str(tmp_path / "q4"), quantize=True, q_group_size=32, q_bits=4)
    args = [
        "fuse",
        "--model",
        str(tmp_path / "q4"),
        "--adapter-path",
        str(adapter),
        "--save-path",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: fuse on a quantized vision-language model (qwen2_vl) is not built yet")
    assert not (tmp_path / "out").exists()


def test_fuse_refuses_an_architecture_not_checked_here_before_loading_it(qwen2_vl, adapter, tmp_path):
    """A vision-language config.json of an architecture outside LAYOUTS (PaliGemma: mlx-vlm builds it,
    mlx-lm has no text model for it): one line from its config alone; the weights are never read."""
    (tmp_path / "base").mkdir()
    config = json.loads((qwen2_vl / "config.json").read_text()) | {"model_type": "paligemma"}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    args = ["fuse", "--model", str(tmp_path / "base"), "--adapter-path", str(adapter)]
    result = CliRunner().invoke(app, [*args, "--save-path", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    supported = "gemma3, idefics3, llava, phi3_v, qwen2_5_vl, qwen2_vl"
    assert errors[0].startswith(f"error: fuse on a vision-language model supports {supported} so far")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["info", "--data", "DATA"]])
def test_a_command_not_built_for_vision_models_says_so_in_one_line(qwen2_vl, shapes, adapter, tmp_path, command):
    where = {"DATA": str(shapes), "ADAPTER": str(adapter), "OUT": str(tmp_path / "fused")}
    result = CliRunner().invoke(app, [*(where.get(a, a) for a in command), "--model", str(qwen2_vl)], input="hi\n")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"error: {command[0]} on a vision-language model" in errors[0] and "is not built yet" in errors[0]
    assert not (tmp_path / "fused").exists()


@pytest.mark.once
def test_an_adapter_learns_to_name_the_colour_of_held_out_squares(qwen2_vl, tmp_path):
    """data/make_shapes.py's task on the random tiny Qwen2-VL: the base never writes a colour's name
    (it has never seen one), the adapter names every held-out square's colour. An answer that ignores
    the image scores at best the test split's most common colour's share (4 colours, drawn uniformly:
    about 1/4), so nearly all right can only come from reading the image."""
    shapes = write_shapes(tmp_path / "shapes", {"train": 48, "valid": 8, "test": 16})
    common = dict(model=str(qwen2_vl), data=str(shapes), adapter_path=str(tmp_path / "adapter"))
    cfg = TrainConfig(**common, iters=200, batch_size=8, num_layers=2, targets="all-linear", learning_rate=2e-3)
    train(cfg, log=lambda _: None)
    result = run(EvalConfig(**common, split="test", task="exact-match", max_tokens=8, compare_base=True), log=print)
    references = [p["reference"] for p in result["predictions"]]
    blind = max(references.count(c) for c in set(references))  # the best answer that ignores the image
    assert result["base"]["answered"] == result["adapter"]["answered"] == 16
    assert result["base"]["correct"] == 0
    assert result["adapter"]["correct"] >= 15 > blind, (
        blind,
        [p["adapter"]["prediction"] for p in result["predictions"]],
    )


def test_a_resumed_vision_run_equals_an_uninterrupted_one(vlm, shapes, tmp_path):
    """Same batches, same images, same steps: the same adapter, bit for bit (one machine, one BLAS);
    with --num-layers 1 each run reads the frozen prefix from its cache, filled anew after the resume."""
    from mlx_lora.training.checkpoint import checkpoint_dir

    common = dict(model=str(vlm), data=str(shapes), batch_size=4, num_layers=1, val_batches=1, iters=4)
    train(TrainConfig(**common, adapter_path=str(tmp_path / "whole")), log=lambda _: None)
    train(TrainConfig(**common, adapter_path=str(tmp_path / "first"), save_every=2), log=lambda _: None)
    at = str(checkpoint_dir(tmp_path / "first", 2))
    resumed = TrainConfig(**common, resume=at, adapter_path=str(tmp_path / "resumed"))
    lines = []
    train(resumed, log=lines.append)
    gemma = json.loads((vlm / "config.json").read_text())["model_type"] == "gemma3"  # its images see later tokens
    said = "speed: an image's tokens see" if gemma else "speed: the image merge and blocks 0-0 are frozen"
    assert any(str(line).startswith(said) for line in lines)
    whole, again = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("whole", "resumed"))
    assert whole.keys() == again.keys() and all(mx.array_equal(whole[k], again[k]).item() for k in whole)


def test_eval_compares_a_vision_adapter_with_its_base(qwen2_vl, shapes, adapter, tmp_path, monkeypatch):
    """The docs' `eval --adapter-path --compare-base`: the base's figures after the adapter's are the
    base's alone (the LoRA layers removed), and the adapter's loss is its own."""
    from mlx_lora.commands.evaluate import run
    from mlx_lora.config import EvalConfig

    monkeypatch.chdir(tmp_path)  # no ./adapters: the second run scores the base
    common = dict(model=str(qwen2_vl), data=str(shapes), split="test", task="exact-match", max_tokens=4)
    both = run(EvalConfig(**common, adapter_path=str(adapter), compare_base=True), log=lambda *_: None)
    alone = run(EvalConfig(**common), log=lambda *_: None)
    assert both["base"] == alone["base"] and both["base"]["answered"] == 2
    assert both["adapter"]["loss"] < both["base"]["loss"]
    assert [p["base"] for p in both["predictions"]] == [p["base"] for p in alone["predictions"]]


# every linear of the tower and projector (by mlx-vlm's names: a name under `model.` is a language
# model's, in the Hub's or transformers' spelling), and the last block's q_proj of the language model
TOWER_REGEX = r"(?!language_model\.|model\.).*|.*\.layers\.1\.self_attn\.q_proj"
TOWERS = [kind for kind in VLM_KINDS if kind != "llava"]  # LLaVA's merge cannot be differentiated: refused


def test_lora_on_llavas_tower_is_refused_in_one_line(shapes, tmp_path):
    from conftest import make_llava

    args = ["train", "--model", str(make_llava(tmp_path / "llava")), "--data", str(shapes), "--targets", TOWER_REGEX]
    result = CliRunner().invoke(app, [*args, "--adapter-path", str(tmp_path / "out"), "--iters", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and "LoRA in llava's vision tower or projector is not built" in errors[0]
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


@pytest.fixture(scope="module")
def tower_adapter(vlm, shapes, tmp_path_factory):
    """Four steps of LoRA on the tower, the projector and one projection of the language model."""
    out = tmp_path_factory.mktemp("tower") / "adapter"
    cfg = TrainConfig(
        model=str(vlm),
        data=str(shapes),
        adapter_path=str(out),
        iters=4,
        batch_size=4,
        num_layers=1,
        targets=TOWER_REGEX,
        rank=4,
        alpha=8,
        learning_rate=5e-2,
    )
    result = train(cfg, log=lambda _: None)
    assert result.val_losses[4] < result.val_losses[0]
    return out


@pytest.mark.parametrize("vlm", TOWERS, indirect=True)
def test_lora_on_the_tower_trains_and_its_peft_export_gives_our_logits(vlm, shapes, tower_adapter, tmp_path):
    """The tower's and projector's adapters learn (the step ran the tower, so its gradient reached
    them: they move the logits far past rounding), and PEFT on transformers' class, wrapping exactly
    those modules under transformers' names, gives our logits on an image."""
    convert(ConvertConfig(str(tower_adapter), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    ours = load_for_inference(str(vlm), str(tower_adapter))
    spell = LAYOUTS[ours.config["model_type"]]
    tower = [p for p in lora_layers(ours.model) if not p.startswith(spell.ours)]
    assert set(tower) == set(outside_language_model(load_base(str(vlm)).model))  # every one of the tower's
    assert set(lora_layers(ours.model)) - set(tower) == {spell.ours + "layers.1.self_attn.q_proj"}
    peft_model = PeftModel.from_pretrained(hf_model(vlm), tmp_path / "peft").eval()
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {spell.to_transformers(p) for p in lora_layers(ours.model)}
    x = prompt_inputs(ours, shapes / "imgs" / "0016.png")
    with torch.no_grad():
        theirs = peft_model(**hf_inputs(ours, x)).logits.numpy()
    got, bound = our_logits(ours, x), tol(ours) * np.abs(theirs).max()
    assert np.abs(got - theirs).max() <= bound
    for path in tower:
        lora_layers(ours.model)[path].off = True
    assert np.abs(our_logits(ours, x) - got).max() > 100 * bound


@pytest.mark.parametrize("vlm", TOWERS, indirect=True)
def test_generate_with_a_tower_adapter_is_transformers_greedy_reply(vlm, shapes, tower_adapter, tmp_path):
    """`generate --image` with the native tower adapter: transformers + PEFT's greedy tokens (as above)."""
    convert(ConvertConfig(str(tower_adapter), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    image = shapes / "imgs" / "0017.png"
    cfg = GenerateConfig(model=str(vlm), prompt=QUESTION, image=[str(image)], max_tokens=6)
    ours = load_for_inference(str(vlm), str(tower_adapter))
    tokens = list(generate(ours, cfg))[-1].token_ids
    peft_model = PeftModel.from_pretrained(hf_model(vlm), tmp_path / "peft").eval()
    assert_greedy_reply(peft_model, ours, image, tokens)


@pytest.mark.parametrize("vlm", TOWERS, indirect=True)
def test_fuse_merges_the_tower_adapter_too(vlm, shapes, tower_adapter, tmp_path):
    """The fused directory, under mlx_vlm.load and transformers' class, gives our base + tower adapter's logits."""
    import mlx_vlm

    out = tmp_path / "fused"
    args = ["fuse", "--model", str(vlm), "--adapter-path", str(tower_adapter), "--save-path", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ours = load_for_inference(str(vlm), str(tower_adapter))
    x = prompt_inputs(ours, shapes / "imgs" / "0016.png")
    want = our_logits(ours, x)
    bound = tol(ours) * np.abs(want).max()
    model, _ = mlx_vlm.load(str(out))
    assert np.abs(our_logits(SimpleNamespace(model=model), x) - want).max() <= bound
    with torch.no_grad():
        theirs = hf_model(out)(**hf_inputs(ours, x)).logits.numpy()
    assert np.abs(theirs - want).max() <= bound
    spell = LAYOUTS[ours.config["model_type"]]
    for path, layer in lora_layers(ours.model).items():  # the fused model without the tower's merge is not it
        layer.off = not path.startswith(spell.ours)
    assert np.abs(our_logits(ours, x) - want).max() > 100 * bound


CACHED = [kind for kind in VLM_KINDS if kind != "gemma3"]  # Gemma 3's images see later tokens: no prefix cache


def lora_step_inputs(vlm, shapes):
    """The base with LoRA on its last block (B drawn, so every gradient is non-zero), and a batch of
    three image rows and a text row."""
    base = load_base(str(vlm))
    use_cpu_kernels(base.model, training=True)
    apply_lora(base.model, LoRAConfig(num_layers=1, targets="q_proj,v_proj", rank=4))
    mx.random.seed(0)
    for layer in lora_layers(base.model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    text = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
    rows = [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()[:3]]
    data = write_jsonl(shapes / "cached.jsonl", [*rows, text])
    token = LAYOUTS[base.config["model_type"]].image_token
    return base, encode_vision_rows(str(data), file_rows(data), base.tokenizer, base.processor, token, 512)


@pytest.mark.parametrize("vlm", CACHED, indirect=True)
def test_a_step_reading_the_prefix_cache_equals_the_uncached_step(vlm, shapes):
    """Loss and gradient from the hidden states kept at block 1 (from the merged embeddings and the
    model's positions: M-RoPE for Qwen-VL) equal the whole language model's on the merged embeddings.
    What runs in another order: the output projection and its backward, on the target rows alone
    (sums over the vocabulary's V terms, the longest), so fp32_tol(V) of each."""
    base, examples = lora_step_inputs(vlm, shapes)
    rows = [0, 1, 2, 3]
    batch = collate(examples, rows)
    results = []
    for feed in (
        VisionFeed(base.model, base.processor),
        VisionFeed(base.model, base.processor, first_trained=1, cache_prefix=True, examples=examples),
    ):
        feed.inputs(examples, rows, batch)  # a first batch fills the cache; the step below reads it
        loss_and_grad = nn.value_and_grad(base.model, lambda model, *x: feed.loss(model, *x))  # noqa: B023
        (loss, _), grads = loss_and_grad(base.model, *feed.inputs(examples, rows, batch))
        results.append((loss.item(), dict(tree_flatten(grads)), feed.cache_prefix))
    (plain, plain_grads, cached_first), (loss, grads, cached) = results
    assert cached and not cached_first
    rel = fp32_tol(len(base.tokenizer))
    assert abs(loss - plain) <= rel * abs(plain)
    assert_tensors_close(grads, plain_grads, rel)
    assert all(np.abs(np.array(g)).max() > 0 for g in plain_grads.values())


@pytest.mark.parametrize("vlm", CACHED, indirect=True)
def test_a_second_epoch_reads_no_image_nor_frozen_block(vlm, shapes, tmp_path, monkeypatch):
    """Two epochs with LoRA in the last block: the tower and the merge run once per row (the 16 train
    rows, the 4 validation rows, the row that checks the cut), not again in the second epoch."""
    from mlx_lora.training import vision

    merged_rows = []
    real = vision.merged
    monkeypatch.setattr(
        vision, "merged", lambda model, tokens, *rest: merged_rows.append(tokens.shape[0]) or real(model, tokens, *rest)
    )
    cfg = TrainConfig(
        model=str(vlm), data=str(shapes), adapter_path=str(tmp_path / "a"), iters=8, batch_size=4, num_layers=1
    )
    train(cfg, log=lambda _: None)
    assert sum(merged_rows) == 16 + 4 + 1
