"""LoRA on a vision-language model: the loss transformers computes, an adapter PEFT loads on the
transformers model with our logits, and generation with an image."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from conftest import VLM_TERMS, fp32_tol, write_jsonl, write_shapes
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.convert import convert
from mlx_lora.commands.evaluate import run
from mlx_lora.config import ConvertConfig, EvalConfig, GenerateConfig, TrainConfig
from mlx_lora.data.batches import collate
from mlx_lora.data.rows import file_rows
from mlx_lora.data.vision import encode_vision_rows
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.inference.generation import generate
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.vision import LAYOUTS
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
    if base.config["model_type"] != "idefics3":  # Qwen-VL's: which tokens are the image's, for its 3-D positions
        out["mm_token_type_ids"] = torch.tensor((ids == base.config["image_token_id"]).astype(np.int64))
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
    pixels = {k: mx.array(np.asarray(x[k])) for k in PIXEL_KEYS if k in x}
    return np.array(base.model(mx.array(np.asarray(x["input_ids"])), pixels.pop("pixel_values"), **pixels).logits)


def test_the_loss_of_a_mixed_batch_is_transformers_loss_on_the_assistant_tokens(vlm, shapes, tmp_path):
    """Two image rows and a text row, padded into one batch: the token-weighted mean of transformers'
    loss per row with labels on the trained tokens only (image merge, 3-D positions, masks)."""
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
        with torch.no_grad():
            out = hf(**hf_inputs(base, x), labels=labels)
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


def test_generate_with_an_image_is_transformers_greedy_reply(vlm, shapes, vlm_adapter, tmp_path):
    """`generate --image` through the PEFT export read back: each token is the one transformers + PEFT
    pick greedily after the same tokens. Our logits are within `bound` of theirs, so our pick's logit
    is within 2·bound of their largest: equal to their pick wherever their two best differ by more
    (a random model's near-ties, which test order can make or break, are the only leeway)."""
    convert(ConvertConfig(str(vlm_adapter), str(tmp_path / "peft"), to="peft"), log=lambda _: None)
    image = shapes / "imgs" / "0017.png"
    cfg = GenerateConfig(model=str(vlm), prompt=QUESTION, image=[str(image)], max_tokens=6)
    ours = load_for_inference(str(vlm), str(tmp_path / "peft"))
    tokens = list(generate(ours, cfg))[-1].token_ids  # mlx-vlm's last response lists them all
    peft_model = PeftModel.from_pretrained(hf_model(vlm), tmp_path / "peft").eval()
    x = prompt_inputs(ours, image)
    n = np.asarray(x["input_ids"]).shape[1]
    forced = x | {"input_ids": np.concatenate([np.asarray(x["input_ids"]), [tokens]], axis=1)}
    with torch.no_grad():
        logits = peft_model(**hf_inputs(ours, forced)).logits[0, n - 1 : n - 1 + len(tokens)].numpy()
    bound = tol(ours) * np.abs(logits).max()
    picked = logits[np.arange(len(tokens)), tokens]
    assert len(tokens) >= 1 and (picked >= logits.max(axis=-1) - 2 * bound).all()


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
    model, processor = mlx_vlm.load(str(out))
    fused_x = prompt_inputs(SimpleNamespace(processor=processor), shapes / "imgs" / "0016.png")
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
    supported = "idefics3, phi3_v, qwen2_5_vl, qwen2_vl"
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


def test_a_resumed_vision_run_equals_an_uninterrupted_one(qwen2_vl, shapes, tmp_path):
    """Same batches, same images, same steps: the same adapter, bit for bit (one machine, one BLAS)."""
    from mlx_lora.training.checkpoint import checkpoint_dir

    common = dict(model=str(qwen2_vl), data=str(shapes), batch_size=4, num_layers=1, val_batches=1, iters=4)
    train(TrainConfig(**common, adapter_path=str(tmp_path / "whole")), log=lambda _: None)
    train(TrainConfig(**common, adapter_path=str(tmp_path / "first"), save_every=2), log=lambda _: None)
    at = str(checkpoint_dir(tmp_path / "first", 2))
    resumed = TrainConfig(**common, resume=at, adapter_path=str(tmp_path / "resumed"))
    train(resumed, log=lambda _: None)
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
