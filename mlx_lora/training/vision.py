"""What a step of a vision-language model reads: the language model's input embeddings, images merged in.

With LoRA in the language model alone, the vision tower, its projector and the merge of image
features into the token embeddings are frozen: they run once per batch here, outside the compiled
step, and the step runs the language model on the merged embeddings with the positions the model
computed for them (Qwen2-VL's 3-D M-RoPE positions; Idefics3's language model counts them from 0
itself). When the adapters sit in the last blocks only, the hidden state entering the first of
them is frozen too: it is computed once per row from the merged embeddings and those positions
and kept (prefix_cache.py, through a cut of the language model, cut.py), so later epochs read
neither the images nor the frozen blocks. When a `--targets` regex put LoRA in the tower or
projector, the step runs the tower and the merge itself, so its gradient reaches them; mlx-vlm's
tower reads array values as it runs (image sizes, token counts), which mx.compile cannot trace,
so that step is not compiled.

Gemma 3's image tokens attend to every token of their own image, later ones included, as transformers'
Gemma 3 computes whenever its processor's token_type_ids are given (training and eval mode alike, and
its generate's prefill); mlx-vlm's language model is causal throughout, so the step runs Gemma 3's
blocks itself with those masks (image_block_masks, gemma3_logits), and its frozen blocks' output is
not cached (the cut runs them causally).
"""

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.config.data import DataConfig
from mlx_lora.data.batches import collate, lengths
from mlx_lora.data.dataset import DataSplit
from mlx_lora.data.mapping import iter_mapped, map_rows
from mlx_lora.data.sources import split_label, split_rows, train_valid_streams
from mlx_lora.data.vision import VisionExample, encode_vision_rows, pixel_inputs
from mlx_lora.errors import UserError
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.model.lora import tower_layers
from mlx_lora.model.vision import layout
from mlx_lora.training.cut import Cut, find_cut
from mlx_lora.training.feed import Feed, target_loss, target_positions
from mlx_lora.training.prefix_cache import PrefixCache


def merged(
    model: nn.Module, tokens: mx.array, attention: mx.array, pixels: dict, one_row: bool = False
) -> tuple[mx.array, mx.array]:
    """(embeddings (B, L, D) with the images' features merged in, positions (3, B, L) or (B, L)):
    the tower, projector and merge as mlx-vlm runs them. A merge that reads its batch as one row
    (`Layout.merges_one_row`, LLaVA's) gets the rows laid end to end, (1, B·L): it places each
    image's features at its tokens in order, and nothing in it depends on a token's position."""
    pixels = dict(pixels)
    values = pixels.pop("pixel_values", None)
    if one_row:
        b, length = tokens.shape
        found = model.get_input_embeddings(tokens.reshape(1, b * length), values, **pixels)
        embeds, positions = found.inputs_embeds.reshape(b, length, -1), None
    else:
        found = model.get_input_embeddings(tokens, values, mask=attention, **pixels)
        embeds, positions = found.inputs_embeds, found.position_ids  # (3, B, L) M-RoPE, or None
    if positions is None:  # counted from 0 (Idefics3, LLaVA): the same, so every model's step reads one shape
        positions = mx.broadcast_to(mx.arange(tokens.shape[1])[None], tokens.shape)  # (B, L)
    return embeds, positions


def language_logits(model: nn.Module):
    """The language model on (tokens (B, T), merged embeddings (B, T, D) or None, positions): a cut's `run`."""
    return lambda x: model.language_model(x[0], x[1], position_ids=x[2]).logits


class VisionFeed(Feed):
    """(tokens, merged embeddings, positions, loss mask) of a batch, and the loss that reads them; the
    hidden states at the first trained block instead, kept per row, where `first_trained` > 0 and
    `cache_prefix`; pixels instead, for a step that runs the tower, where LoRA sits in it."""

    def __init__(
        self, model: nn.Module, processor, log=print, first_trained: int = 0, cache_prefix: bool = False, examples=()
    ):
        self.model, self.processor = model, processor
        tower = tower_layers(model)
        self.tower, self.compiled = bool(tower), not tower
        self.image_blocks = model.config.model_type in IMAGE_BLOCKS
        self.one_row = layout({"model_type": model.config.model_type}, "training").merges_one_row
        if tower and self.one_row:  # LLaVA's: `inputs_embeds[:, positions, :] = features`
            raise UserError(
                f"--targets: LoRA in {model.config.model_type}'s vision tower or projector is not built: mlx-vlm's "
                "merge writes the image features into the embeddings in place, which MLX cannot differentiate; "
                "target the language model's layers"
            )
        cacheable = cache_prefix and first_trained > 0 and len(examples) > 0 and not tower and not self.image_blocks
        cut = vision_cut(self, examples, first_trained, log) if cacheable else None
        super().__init__(cut, cache_prefix=cut is not None, log=log)
        if tower:
            log(f"vision: LoRA on {len(tower)} layers of the tower or projector, which run in the loss, uncompiled")
        elif self.cache_prefix:
            log(f"speed: the image merge and blocks 0-{first_trained - 1} are frozen; their output is kept per row")
        elif cache_prefix and first_trained > 0 and self.image_blocks:
            log("speed: an image's tokens see its later ones, which a cut's blocks do not: every block runs every step")

    def pixels(self, examples: Sequence[VisionExample], rows: list[int], batch) -> tuple[mx.array, dict]:
        """(attention (B, L), the processor's pixel inputs of the rows' images, {} for none)."""
        sizes = np.array([len(examples[i].tokens) for i in rows])
        attention = mx.array((np.arange(batch[0].shape[1])[None] < sizes[:, None]).astype(np.int32))  # (B, L)
        images = [p for i in rows for p in examples[i].images]
        return attention, {k: mx.array(v) for k, v in pixel_inputs(self.processor, images).items()} if images else {}

    def frozen(self, examples: Sequence[VisionExample], rows: list[int], batch) -> tuple[mx.array, mx.array]:
        """The merged embeddings (B, L, D) and positions of a batch, out of the gradient."""
        embeds, positions = merged(self.model, batch[0], *self.pixels(examples, rows, batch), self.one_row)
        embeds = mx.stop_gradient(embeds)
        mx.eval(embeds, positions)
        return embeds, positions

    def blocks(self, tokens: mx.array) -> tuple:
        """Gemma 3's masks for its blocks (image_block_masks) on the inputs of `tokens` (B, L), as a 1-tuple; ()
        for a model whose blocks are causal throughout."""
        if not self.image_blocks:
            return ()
        is_image = np.array(tokens[:, :-1]) == self.model.config.image_token_index
        return (image_block_masks(is_image, self.model.language_model.config.sliding_window),)

    def inputs(self, examples: Sequence[VisionExample], rows: list[int], batch: tuple[mx.array, ...]):
        tokens, mask = batch  # (B, L) each, right-padded
        if self.tower:
            return tokens, mask, *self.pixels(examples, rows, batch), *self.blocks(tokens)
        if not self.cache_prefix:
            embeds, positions = self.frozen(examples, rows, batch)
            return tokens, embeds[:, :-1], positions[..., :-1], mask, *self.blocks(tokens)
        flat, weights = target_positions(np.array(mask))
        targets = np.array(tokens)[:, 1:].reshape(-1)[flat]  # (N,)
        cache = self.cache(examples)
        width = tokens.shape[1] - 1
        states, positions = cache.states(rows, width), cache.positions(rows, width)
        return tokens[:, :-1], states, positions, mx.array(flat), mx.array(targets), mx.array(weights)

    def new_cache(self, examples: Sequence[VisionExample]) -> PrefixCache:
        return VisionPrefixCache(self, examples)

    def loss(self, model: nn.Module, *inputs) -> tuple[mx.array, mx.array]:
        """Mean cross-entropy over the masked targets (feed.loss_fn's, on the merged embeddings)."""
        if self.cache_prefix:
            tokens, states, positions, *flat = inputs
            # embeddings the skipped blocks never read, so the language model does not embed the tokens
            # itself (Phi-3-vision's reads their values to find its images, which mx.compile cannot trace)
            unread = mx.broadcast_to(mx.zeros((1, 1, states.shape[-1]), states.dtype), states.shape)
            return target_loss(self.cut, (tokens, unread, positions), states, *flat)
        if self.tower:
            tokens, mask, attention, pixels, *blocks = inputs
            embeds, positions = merged(model, tokens, attention, pixels, self.one_row)
            return self.full_loss(model, tokens, embeds[:, :-1], positions[..., :-1], mask, *blocks)
        return self.full_loss(model, *inputs)

    @staticmethod
    def full_loss(model: nn.Module, tokens, embeds, positions, mask, attention=None) -> tuple[mx.array, mx.array]:
        inputs, targets = tokens[:, :-1], mx.maximum(tokens[:, 1:], 0)  # (B, L-1); Phi-3-vision's image
        # tokens are negative ids (never targets: weight 0), which no logit's index may be
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


def vision_cut(feed: VisionFeed, examples: Sequence[VisionExample], k: int, log) -> Cut | None:
    """The language model cut before block k, checked on the first shortest row's merged embeddings."""
    rows = [int(lengths(examples).argmin())]
    batch = collate(examples, rows)
    embeds, positions = feed.frozen(examples, rows, batch)
    probe = (batch[0][:, :-1], embeds[:, :-1], positions[..., :-1])
    return find_cut(feed.model.language_model, k, probe, log, run=language_logits(feed.model))


class VisionPrefixCache(PrefixCache):
    """PrefixCache's states of a vision-language model's rows, each computed from its merged
    embeddings and the model's positions, which are kept beside them for the trained blocks."""

    def __init__(self, feed: VisionFeed, examples: Sequence[VisionExample]):
        super().__init__(feed.cut, examples, feed.log, feed.trial)
        self.feed, self.kept_positions = feed, {}

    def _fill(self, indices: list[int]) -> None:
        batch = collate(self.examples, indices)
        embeds, positions = self.feed.frozen(self.examples, indices, batch)
        inputs = (batch[0][:, :-1], embeds[:, :-1], positions[..., :-1])
        h = self.cut.prefix(inputs)  # (B, L-1, D)
        mx.eval(h)
        self._keep(indices, h)
        kept = np.array(inputs[2])  # (3, B, L-1) or (B, L-1)
        for row, i in enumerate(indices):
            self.kept_positions[i] = kept[..., row, : self.offsets[i + 1] - self.offsets[i]]

    def positions(self, indices: list[int], width: int) -> mx.array:
        """The rows' positions, (3, B, width) or (B, width); 0 past each row's end (padding, never attended)."""
        first = self.kept_positions[indices[0]]
        out = np.zeros((*first.shape[:-1], len(indices), width), first.dtype)
        for row, i in enumerate(indices):
            kept = self.kept_positions[i]
            out[..., row, : kept.shape[-1]] = kept
        return mx.array(out)


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
            as_text=spell.images_as_text,
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
    examples = encode_vision_rows(
        label,
        rows,
        base.tokenizer,
        base.processor,
        spell.image_token,
        max_seq_length,
        log,
        as_text=spell.images_as_text,
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
