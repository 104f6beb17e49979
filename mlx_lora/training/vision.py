"""What a step of a vision-language model reads: the language model's input embeddings, images merged in.

LoRA sits in the language model's blocks only, so the vision tower, its projector and the merge of
image features into the token embeddings are frozen: they run once per batch here, outside the
compiled step, and the step runs the language model on the merged embeddings with the positions
the model computed for them (Qwen2-VL's 3-D M-RoPE positions; Idefics3's language model counts
them from 0 itself). The block-level frozen-prefix cache (prefix_cache.py) is not used: its cut
runs mlx-lm's blocks on 1-D positions.

Gemma 3's image tokens attend to every token of their own image, later ones included, as transformers'
Gemma 3 computes whenever its processor's token_type_ids are given (training and eval mode alike, and
its generate's prefill); mlx-vlm's language model is causal throughout, so the step runs Gemma 3's
blocks itself with those masks (image_block_masks, gemma3_logits).
"""

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.config.data import DataConfig
from mlx_lora.data.dataset import DataSplit
from mlx_lora.data.mapping import iter_mapped, map_rows
from mlx_lora.data.sources import split_label, split_rows, train_valid_streams
from mlx_lora.data.vision import VisionExample, encode_vision_rows, pixel_inputs
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.model.vision import layout
from mlx_lora.training.feed import Feed


class VisionFeed(Feed):
    """(tokens, merged embeddings, positions, loss mask) of a batch, and the loss that reads them."""

    def __init__(self, model: nn.Module, processor, log=print):
        super().__init__(None, cache_prefix=False, log=log)
        self.model, self.processor = model, processor

    def inputs(self, examples: Sequence[VisionExample], rows: list[int], batch: tuple[mx.array, ...]):
        tokens, mask = batch  # (B, L) each, right-padded
        sizes = np.array([len(examples[i].tokens) for i in rows])
        attention = mx.array((np.arange(tokens.shape[1])[None] < sizes[:, None]).astype(np.int32))  # (B, L)
        images = [p for i in rows for p in examples[i].images]
        pixels = {k: mx.array(v) for k, v in pixel_inputs(self.processor, images).items()} if images else {}
        found = self.model.get_input_embeddings(tokens, pixels.pop("pixel_values", None), mask=attention, **pixels)
        embeds = mx.stop_gradient(found.inputs_embeds)  # (B, L, D)
        positions = found.position_ids  # (3, B, L) M-RoPE; None where the model counts from 0 (Idefics3)
        if positions is None:  # the same positions, so every model's step reads one shape of input
            positions = mx.broadcast_to(mx.arange(tokens.shape[1])[None], tokens.shape)  # (B, L)
        mx.eval(embeds, positions)
        if self.model.config.model_type not in IMAGE_BLOCKS:
            return tokens, embeds[:, :-1], positions[..., :-1], mask
        text = self.model.language_model.config
        image = self.model.config.image_token_index
        attention = image_block_masks(np.array(tokens[:, :-1]) == image, text.sliding_window)
        return tokens, embeds[:, :-1], positions[..., :-1], mask, attention

    def loss(self, model: nn.Module, tokens, embeds, positions, mask, attention=None) -> tuple[mx.array, mx.array]:
        """Mean cross-entropy over the masked targets (feed.loss_fn's, on the merged embeddings)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L-1)
        weights = mask[:, 1:].astype(mx.float32)  # (B, L-1)
        if attention is None:
            logits = model.language_model(inputs, embeds, position_ids=positions).logits  # (B, L-1, V)
        else:
            logits = gemma3_logits(model.language_model, embeds, attention)
        ce = cross_entropy(logits.astype(mx.float32), targets) * weights
        ntoks = weights.sum()
        return ce.sum() / mx.maximum(ntoks, 1), ntoks


IMAGE_BLOCKS = ("gemma3",)  # architectures whose image tokens see their whole image (transformers' token_type_ids)


def image_block_masks(is_image: np.ndarray, window: int) -> mx.array:
    """(2, B, 1, L, L) bool: may query q attend to key k, in a global block ([0]) and in a sliding-window
    block ([1]): causally, or both in one image's run of tokens (transformers' Gemma 3 masks with
    token_type_ids: causal OR same image; and, in a sliding block, within the window, k > q - window)."""
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]  # (B, L): the first token of each run
    run = np.where(is_image, np.cumsum(starts, axis=1), 0)  # (B, L): 1, 2, ... per image, 0 for text
    q, k = np.arange(is_image.shape[1])[:, None], np.arange(is_image.shape[1])[None]
    same = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] > 0)  # (B, L, L)
    full = (k <= q) | same
    return mx.array(np.stack([full, full & (k > q - window)])[:, :, None])


def gemma3_logits(lm: nn.Module, embeds: mx.array, attention: mx.array) -> mx.array:
    """(B, L, V) logits of mlx-vlm's Gemma 3 language model on merged embeddings, each block given its own
    mask of image_block_masks (its __call__ gives every block one mask): the same steps as its
    Gemma3Model (embeddings times √width, in bfloat16 as mlx-vlm rounds it; blocks; norm) and head."""
    text = lm.model
    h = embeds  # (B, L, D)
    if text.scale_inputs_embeds:
        h = h * mx.array(text.config.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    pattern = text.sliding_window_pattern
    for i, layer in enumerate(text.layers):
        h = layer(h, attention[0 if i % pattern == pattern - 1 else 1])
    return lm.lm_head(text.norm(h))


def vision_sets(source, data: DataConfig, base, max_seq_length: int, log=print, **masking) -> dict[str, list]:
    """The training and validation examples of a vision-language base's rows (data/vision.py)."""
    token = layout(base.config, "training").image_token
    train, valid = train_valid_streams(source, data, log)
    return {
        role: encode_vision_rows(
            split_label(source, data, role),
            iter_mapped(rows, data),
            base.tokenizer,
            base.processor,
            token,
            max_seq_length,
            log,
            **masking,
        )
        for role, rows in (("train", train), ("valid", valid))
    }


def vision_split(
    source, data: DataConfig, base, wanted: str, max_seq_length: int, first: int | None, log=print
) -> DataSplit:
    """One split of a vision-language base's rows, as training encodes them (eval's), its first
    `first` rows only. Not kept in --data-cache: a cached set would not see an image changed on disk."""
    token = layout(base.config, "eval").image_token
    rows = map_rows(split_rows(source, data, wanted, log)[:first], data)
    label = split_label(source, data, wanted)
    examples = encode_vision_rows(label, rows, base.tokenizer, base.processor, token, max_seq_length, log)
    return DataSplit(examples, lambda say=log: rows)


def vision_refusals(objective: str, pack: bool, stream_prefix: str, group: int) -> list[str]:
    """What a vision-language run does not do yet, each as one line."""
    return [
        why
        for refused, why in (
            (objective != "sft", f"--objective {objective}: a vision-language model trains with sft only so far"),
            (pack, "--pack: rows holding images are not packed; drop --pack"),
            (stream_prefix == "on", "--stream-prefix on: a vision-language model is trained in memory"),
            (group > 1, "a vision-language model trains in one process so far; start it without mlx.launch"),
        )
        if refused
    ]
