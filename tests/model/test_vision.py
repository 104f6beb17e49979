"""A vision-language base loads through mlx-vlm and computes what transformers computes."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from conftest import VLM_TERMS, fp32_tol, image_token_id, write_shapes
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mlx_lora.config import LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import select_targets
from mlx_lora.model.vision import LAYOUTS, forward, is_vision, layout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    shapes = write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 1}, size=56)
    return Image.open(shapes / "imgs" / "0000.png").convert("RGB")


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
PROMPTS = {  # a user turn holding one image, as each chat template writes it
    "qwen2_vl": QWEN_PROMPT,
    "qwen2_5_vl": QWEN_PROMPT,
    "idefics3": "<|im_start|>User:<image>What colour?<end_of_utterance>\n",
    "gemma3": "<start_of_turn>user\n<start_of_image>What colour?<end_of_turn>\n",
    "llava": "USER: <image>\nWhat colour? ",
}
PIXELS = {  # transformers' own image processor of each, and what it makes of one 56x56 image
    # 4x4 patches of 14 pixels, merged 2x2 into 4 tokens
    "qwen2_vl": (Qwen2VLImageProcessorPil, {"image_grid_thw": [[1, 4, 4]]}, 4),
    "qwen2_5_vl": (Qwen2VLImageProcessorPil, {"image_grid_thw": [[1, 4, 4]]}, 4),
    # resized to 112 pixels and cut into 2x2 tiles of 56, plus the whole image: 5 tiles of 4 tokens
    "idefics3": (Idefics3ImageProcessorPil, {"pixel_attention_mask": np.ones((1, 5, 56, 56), int).tolist()}, 20),
    # resized to 56 pixels: 4x4 patches of 14, average-pooled 2x2 into mm_tokens_per_image = 4 tokens
    "gemma3": (Gemma3ImageProcessorPil, {}, 4),
    # 4x4 patches of 14 pixels, the CLS token dropped: 16 tokens
    "llava": (CLIPImageProcessorPil, {}, 16),
}


def inputs(base, image) -> dict[str, np.ndarray]:
    """One prompt holding `image`, as the model's own processor makes it (its placeholder expanded)."""
    out = base.processor(text=[PROMPTS[base.config["model_type"]]], images=[image], add_special_tokens=False)
    return {k: np.asarray(v) for k, v in out.items() if k != "attention_mask"}


def transformers_logits(model_dir, x) -> np.ndarray:
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])  # Qwen2VLForConditionalGeneration, ...
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    given = {k: torch.tensor(v) for k, v in x.items()}
    if "image_grid_thw" in x:  # Qwen-VL's: which tokens are the image's, for its 3-D positions
        given["mm_token_type_ids"] = torch.tensor((x["input_ids"] == image_token_id(config)).astype(np.int64))
    with torch.no_grad():
        return model(**given).logits.numpy()


def test_vision_model_loads_through_mlx_vlm_with_its_processor(vlm, image):
    base = load_base(str(vlm))
    kind = base.config["model_type"]
    assert base.processor is not None and type(base.model).__module__ == f"mlx_vlm.models.{kind}.{kind}"
    assert len(base.model.layers) == 2  # the language model's blocks, where LoRA goes
    x = inputs(base, image)
    processor, shapes, image_tokens = PIXELS[kind]
    assert all(x[k].tolist() == v for k, v in shapes.items())
    assert (x["input_ids"] == image_token_id(base.config)).sum() == image_tokens
    # the processor's pixels are transformers' own image processor's (both float32 over the same resize)
    theirs = processor.from_pretrained(vlm)(images=[image], return_tensors="np")
    np.testing.assert_allclose(x["pixel_values"], theirs["pixel_values"], atol=fp32_tol(3 * 14 * 14), rtol=0)


def test_logits_with_an_image_equal_transformers(vlm, image):
    base = load_base(str(vlm))
    x = inputs(base, image)
    ours = forward(base.model, {k: mx.array(v) for k, v in x.items()})  # as mlx-vlm's generation runs it
    want = transformers_logits(vlm, x)
    # fp32 through other kernels: n·EPS of the logits' size, n the terms of the longest sums on the
    # way (conftest's VLM_TERMS: the 2 blocks' 128-wide MLPs; Idefics3's patch sums besides)
    tol = fp32_tol(VLM_TERMS[base.config["model_type"]])
    assert np.abs(np.array(ours) - want).max() <= tol * np.abs(want).max()


def test_only_checked_architectures_train():
    assert layout({"model_type": "qwen2_vl"}, "training") is LAYOUTS["qwen2_vl"]
    assert layout({"model_type": "qwen2_5_vl"}, "training") is LAYOUTS["qwen2_5_vl"]
    assert layout({"model_type": "idefics3"}, "training") is LAYOUTS["idefics3"]
    assert layout({"model_type": "gemma3"}, "training") is LAYOUTS["gemma3"]
    assert layout({"model_type": "llava"}, "training") is LAYOUTS["llava"]
    assert layout({"model_type": "phi3_v"}, "training") is LAYOUTS["phi3_v"]  # checked against mlx-vlm (test_phi3_v.py)
    supported = "gemma3, idefics3, llava, phi3_v, qwen2_5_vl, qwen2_vl"
    with pytest.raises(UserError, match=f"supports {supported} so far, not 'paligemma'"):
        layout({"model_type": "paligemma", "vision_config": {}}, "training")


@pytest.mark.parametrize(
    "config, vision",
    [
        ({"model_type": "qwen2_vl", "vision_config": {}}, True),  # checked here: mlx-vlm
        ({"model_type": "qwen2_5_vl", "vision_config": {}}, True),  # checked here (mlx-lm would read its text alone)
        ({"model_type": "idefics3", "vision_config": {}}, True),  # checked here (SmolVLM)
        ({"model_type": "phi3_v", "vision_config": {}}, True),
        ({"model_type": "phi3_v", "img_processor": {"image_dim_out": 1024}}, True),  # Phi-3-vision's Hub config
        # checked here with a CLIP tower (LLaVA-1.5; transformers' default for a vision_config without a model_type)
        ({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}, True),
        ({"model_type": "llava", "vision_config": {}}, True),
        ({"model_type": "llava", "vision_config": {"model_type": "pixtral"}}, False),  # mlx-lm reads it as mistral3
        ({"model_type": "gemma3", "vision_config": {}}, True),  # checked here (mlx-lm would read its text alone)
        ({"model_type": "gemma3", "text_config": {"hidden_size": 64}}, False),  # no tower: mlx-lm, as before
        ({"model_type": "gemma3_text"}, False),
        ({"model_type": "mistral3", "vision_config": {}}, False),
        ({"model_type": "qwen2"}, False),
    ],
)
def test_a_multimodal_checkpoint_mlx_lm_reads_stays_a_text_base(config, vision):
    assert is_vision(config) is vision


def test_a_targets_regex_reaches_the_tower_and_projector_by_any_of_their_names(qwen2_vl):
    """mlx-vlm's, the Hub checkpoint's and transformers' names of one tower layer pick it; names and
    all-linear stay in the language model's last --num-layers blocks; a target naming nothing is one line."""
    model = load_base(str(qwen2_vl)).model
    pick = lambda targets: select_targets(model, LoRAConfig(targets=targets, num_layers=1))  # noqa: E731
    for regex in (r"vision_tower\.blocks\.0\.attn\.qkv", r"visual\.blocks\.0\.attn\.qkv", r"model\.visual\..*qkv"):
        assert pick(regex) == ["vision_tower.blocks.0.attn.qkv"]
    assert pick(r"visual\.merger\.mlp\.\d|.*layers\.\d\.self_attn\.q_proj") == [
        "language_model.model.layers.1.self_attn.q_proj",  # block 0 is not among the last 1
        "vision_tower.merger.mlp.0",
        "vision_tower.merger.mlp.2",
    ]
    assert all(p.startswith("language_model.model.layers.1.") for p in pick("all-linear") + pick("q_proj,v_proj"))
    with pytest.raises(
        UserError,
        match="'fc1' matches no linear module in the selected blocks; they have: mlp.down.*; a regex reaches",
    ):
        pick("q_proj,fc1")
    with pytest.raises(UserError, match=r"'visual\\.nothing' matches no linear module in the selected blocks nor the"):
        pick(r"visual\.nothing")


def test_a_layout_names_the_tower_as_transformers_5_does_and_refuses_what_it_cannot_name():
    """mlx-vlm keeps transformers' names for the tower's parts but transformers' `model.` (Idefics3),
    or a Layout's `tower` says how it renamed one (Qwen-VL's `visual`); the head has no PEFT name here."""
    qwen, idefics3 = LAYOUTS["qwen2_vl"], LAYOUTS["idefics3"]
    assert qwen.to_transformers("vision_tower.blocks.0.attn.qkv") == "model.visual.blocks.0.attn.qkv"
    assert qwen.from_transformers("model.visual.blocks.0.attn.qkv") == "vision_tower.blocks.0.attn.qkv"
    assert qwen.checkpoint_as_transformers("visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"
    assert idefics3.to_transformers("connector.modality_projection.proj") == "model.connector.modality_projection.proj"
    assert (
        idefics3.from_transformers("model.connector.modality_projection.proj") == "connector.modality_projection.proj"
    )
    assert (
        idefics3.from_transformers("language_model.layers.1.self_attn.q_proj")
        == "language_model.layers.1.self_attn.q_proj"
    )
    with pytest.raises(UserError, match="language_model.lm_head: no transformers name for this module"):
        qwen.to_transformers("language_model.lm_head")


@pytest.mark.parametrize("vlm", ["gemma3"], indirect=True)  # the others' EOS is their end of turn
def test_generation_through_mlx_vlm_stops_at_the_templates_end_of_turn(vlm, tmp_path):
    """Gemma 3's config.json may list <eos> alone (mlx-vlm stops on its eos_token_id): the chat template's
    <end_of_turn> stops mlx-vlm's generation too, as it stops a text model's."""
    import shutil

    from mlx_lora.model.stops import end_of_turn

    model_dir = shutil.copytree(vlm, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    eos = load_base(str(vlm), lazy=True).tokenizer.eos_token_id
    (model_dir / "config.json").write_text(json.dumps(config | {"eos_token_id": eos}))
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    base = load_base(str(model_dir), lazy=True)
    eot = end_of_turn(base.processor.tokenizer)
    assert eot is not None and eot != eos
    assert {eos, eot} <= set(base.processor.tokenizer.stopping_criteria.eos_token_ids)


@pytest.mark.parametrize("vlm", ["gemma3"], indirect=True)
def test_a_gemma3_without_a_vision_config_still_loads_through_mlx_lm(vlm, tmp_path):
    """The same checkpoint with its vision_config taken out is a text model, as before: mlx-lm reads its
    language model, which computes what mlx-vlm's does on text (mlx-lm reads the vocabulary size at the
    top of config.json; its default is the Hub's 262208)."""
    import shutil

    text_dir = shutil.copytree(vlm, tmp_path / "text")
    config = json.loads((text_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "vision_config"} | {
        "vocab_size": config["text_config"]["vocab_size"]
    }
    (text_dir / "config.json").write_text(json.dumps(config))
    text, vision = load_base(str(text_dir)), load_base(str(vlm))
    assert text.processor is None and type(text.model).__module__ == "mlx_lm.models.gemma3"
    ids = mx.array([text.tokenizer.encode("<start_of_turn>user\nSay hi<end_of_turn>\n")])
    got, want = np.array(text.model(ids)), np.array(forward(vision.model, {"input_ids": ids}))
    # the same blocks through two implementations: fp32 rounding of the 2 blocks' 128-wide MLP sums
    assert np.abs(got - want).max() <= fp32_tol(2 * 128) * np.abs(want).max()
