"""What a step of a vision-language model reads: the language model's input embeddings, images merged in.

LoRA sits in the language model's blocks only, so the vision tower, its projector and the merge of
image features into the token embeddings are frozen: they run once per batch here, outside the
compiled step, and the step runs the language model on the merged embeddings with the positions
the model computed for them (Qwen2-VL's 3-D M-RoPE positions; Idefics3's language model counts
them from 0 itself). The block-level frozen-prefix cache (prefix_cache.py) is not used: its cut
runs mlx-lm's blocks on 1-D positions.
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
        return tokens, embeds[:, :-1], positions[..., :-1], mask

    def loss(self, model: nn.Module, tokens, embeds, positions, mask) -> tuple[mx.array, mx.array]:
        """Mean cross-entropy over the masked targets (feed.loss_fn's, on the merged embeddings)."""
        inputs, targets = tokens[:, :-1], mx.maximum(tokens[:, 1:], 0)  # (B, L-1); Phi-3-vision's image
        # tokens are negative ids (never targets: weight 0), which no logit's index may be
        weights = mask[:, 1:].astype(mx.float32)  # (B, L-1)
        logits = model.language_model(inputs, embeds, position_ids=positions).logits  # (B, L-1, V)
        ce = cross_entropy(logits.astype(mx.float32), targets) * weights
        ntoks = weights.sum()
        return ce.sum() / mx.maximum(ntoks, 1), ntoks


def vision_sets(source, data: DataConfig, base, max_seq_length: int, log=print, **masking) -> dict[str, list]:
    """The training and validation examples of a vision-language base's rows (data/vision.py)."""
    spell = layout(base.config, "training")
    train, valid = train_valid_streams(source, data, log)
    return {
        role: encode_vision_rows(
            split_label(source, data, role),
            iter_mapped(rows, data),
            base.tokenizer,
            base.processor,
            spell.image_token,
            max_seq_length,
            log,
            **masking,
            as_text=spell.as_text if spell.numbered else None,
        )
        for role, rows in (("train", train), ("valid", valid))
    }


def vision_split(
    source, data: DataConfig, base, wanted: str, max_seq_length: int, first: int | None, log=print
) -> DataSplit:
    """One split of a vision-language base's rows, as training encodes them (eval's), its first
    `first` rows only. Not kept in --data-cache: a cached set would not see an image changed on disk."""
    spell = layout(base.config, "eval")
    rows = map_rows(split_rows(source, data, wanted, log)[:first], data)
    label = split_label(source, data, wanted)
    as_text = spell.as_text if spell.numbered else None
    examples = encode_vision_rows(
        label, rows, base.tokenizer, base.processor, spell.image_token, max_seq_length, log, as_text=as_text
    )
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
