"""Rows for a vision-language base: chat rows whose user turns hold images, and text-only rows.

A user turn's content may be a list of parts, {"type": "text", "text": ...} and {"type": "image",
"image": "imgs/0001.png"} (a path relative to the data file). The conversation is rendered whole by
the chat template with each image as the template's placeholder, masked as any chat row
(chat.encode_chat: assistant turns only), and each placeholder then replaced by the run of image
tokens the model's own processor makes of that image, never a target. The images are read again
when a batch needs their pixels (pixel_inputs), so a set holds paths and tokens, not pixels.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_lora.data.chat import encode_chat
from mlx_lora.data.examples import ExampleSet, check_same_format, encode_row
from mlx_lora.data.rows import Row, row_format
from mlx_lora.errors import UserError

IMAGE, TEXT = "image", "text"


@dataclass
class VisionExample:
    tokens: np.ndarray  # (T,) int32, each image as its processor's run of image tokens
    mask: np.ndarray  # (T,) bool: token t is a training target
    images: tuple[Path, ...]  # in the order their runs appear in `tokens`


@dataclass(frozen=True, eq=False)
class VisionSet(ExampleSet):
    """An ExampleSet whose rows also name their images, so batches, masks and lengths read it as any set."""

    images: tuple[tuple[Path, ...], ...] = ()  # (N,): example i's images

    @classmethod
    def of_examples(cls, examples: list[VisionExample]) -> "VisionSet":
        flat = ExampleSet.of(examples)
        return cls(flat.tokens, flat.mask, flat.offsets, tuple(ex.images for ex in examples))

    def __getitem__(self, i: int) -> VisionExample:
        ex = super().__getitem__(i)
        return VisionExample(ex.tokens, ex.mask, self.images[i])


def data_file(where: str) -> Path | None:
    """The JSONL file a row came from ("dir/train.jsonl:12"), or None for a dataset's row."""
    path = Path(where.rsplit(":", 1)[0])
    return path if path.is_file() else None


def _image_part(where: str, part, root: Path | None) -> Path | None:
    """The image a content part names (None for a text part); a part of another shape is an error."""
    if isinstance(part, dict) and part.get("type") == TEXT and isinstance(part.get("text"), str):
        return None
    if not (isinstance(part, dict) and part.get("type") == IMAGE and isinstance(part.get(IMAGE), str)):
        raise UserError(
            f'{where} must be {{"type": "text", "text": string}} or {{"type": "image", "image": "path"}}, '
            f"got {part!r:.60}"
        )
    if root is None:
        raise UserError(f"{where}: image paths are read relative to a JSONL data file; give --data a file or folder")
    return root / part[IMAGE]


def split_images(where: str, fields: dict) -> tuple[dict, dict, list[Path]]:
    """(the row for the template: image parts as {"type": "image"}; the row as the text checks read
    it, each content list as its text; the images in order)."""
    messages = fields.get("messages")
    if not isinstance(messages, list):
        return fields, fields, []
    file = data_file(where)
    root = None if file is None else file.parent
    template, checked, images = [], [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            template.append(m)
            checked.append(m)
            continue
        if m.get("role") != "user":
            raise UserError(f"{where}: messages[{i}]: only a user turn's content may be a list of text and image parts")
        found = [_image_part(f"{where}: messages[{i}].content[{j}]", p, root) for j, p in enumerate(content)]
        images += [p for p in found if p is not None]
        template.append({**m, "content": [{"type": IMAGE} if p else part for p, part in zip(found, content)]})
        checked.append({**m, "content": " ".join(part["text"] for p, part in zip(found, content) if p is None)})
    return {**fields, "messages": template}, {**fields, "messages": checked}, images


def open_image(where: str, path: Path):
    """The image as RGB, decoded now so a broken file is refused here, naming its row."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{where}: image {path}: no such file (image paths are relative to the data file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        why = f"cannot read it ({e}); give a PNG, JPEG or other image Pillow reads"
        raise UserError(f"{where}: image {path}: {why}") from None


def expand_images(where: str, tokens, mask, images: list[Path], processor, image_token: str) -> tuple:
    """Each of the template's image placeholders replaced by its image's run of tokens (masked out)."""
    token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    at = np.flatnonzero(tokens == token_id)
    if len(at) != len(images):
        raise UserError(
            f"{where}: {len(images)} image part(s) but the chat template wrote {len(at)} image placeholder(s) "
            f"{image_token!r}; give each image as one image part and leave {image_token!r} out of the text"
        )
    out_tokens, out_mask, start = [], [], 0
    for i, path in zip(at, images):
        image = open_image(where, path)
        run = np.asarray(processor(text=[image_token], images=[image], add_special_tokens=False)["input_ids"])[0]
        out_tokens += [tokens[start:i], run.astype(np.int32)]
        out_mask += [mask[start:i], np.zeros(len(run), bool)]
        start = i + 1
    out_tokens.append(tokens[start:])
    out_mask.append(mask[start:])
    return np.concatenate(out_tokens), np.concatenate(out_mask)


def encode_vision_row(
    where: str, fields: dict, tokenizer, processor, image_token: str, **masking
) -> tuple[VisionExample, str]:
    """A row's tokens, mask and images, and its row format; a row without images is encoded as for a text model."""
    template, checked, images = split_images(where, fields)
    fmt = row_format(where, checked)
    if not images:
        ex = encode_row(where, tokenizer, fmt, fields, **masking)
        return VisionExample(ex.tokens, ex.mask, ()), fmt
    tokens, mask = encode_chat(where, tokenizer, template, **masking)
    mask[:1] = False  # nothing predicts the first token
    tokens, mask = expand_images(where, tokens, mask, images, processor, image_token)
    return VisionExample(tokens, mask, tuple(images)), fmt


def encode_vision_rows(
    label: str,
    rows: Iterable[Row],
    tokenizer,
    processor,
    image_token: str,
    max_seq_length: int,
    log=print,
    train_on_prompt: bool = False,
    train_on_reasoning: bool = True,
) -> VisionSet:
    """Rows -> examples. A row longer than --max-seq-length is cut there when the cut leaves its
    images whole, else refused (an image's tokens are all the model reads of it)."""
    examples, first, truncated, count = [], None, 0, 0
    masking = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
    for row in rows:
        count += 1
        ex, fmt = encode_vision_row(row.where, row.fields, tokenizer, processor, image_token, **masking)
        first = first or (fmt, row)
        check_same_format(row, fmt, *first)
        if len(ex.tokens) > max_seq_length:
            last_image = np.flatnonzero(ex.tokens == processor.tokenizer.convert_tokens_to_ids(image_token))
            if len(last_image) and last_image[-1] >= max_seq_length:
                raise UserError(
                    f"{row.where}: its images end at token {last_image[-1] + 1}, past --max-seq-length "
                    f"{max_seq_length}; raise --max-seq-length or use smaller images"
                )
            truncated += 1
            ex = VisionExample(ex.tokens[:max_seq_length], ex.mask[:max_seq_length], ex.images)
        if ex.mask.any():
            examples.append(ex)
    if not count:
        raise UserError(f"{label}: no rows")
    if truncated:
        log(f"warning: {truncated} of {count} rows in {label} are longer than --max-seq-length and were truncated")
    if not examples:
        raise UserError(f"{label}: no row has a token to learn from within --max-seq-length {max_seq_length}")
    return VisionSet.of_examples(examples)


def pixel_inputs(processor, images: list[Path]) -> dict[str, np.ndarray]:
    """What the model's vision tower reads for `images`, in order, from the model's own image processor
    (Qwen2-VL: pixel_values (patches, C·t·p·p) and image_grid_thw (images, 3))."""
    out = processor.image_processor(images=[open_image(str(p), p) for p in images])
    return {k: np.asarray(v) for k, v in out.items()}
