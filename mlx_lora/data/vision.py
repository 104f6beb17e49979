"""Rows for a vision-language base: chat rows whose user turns hold images, and text-only rows.

A user turn's content may be a list of parts, {"type": "text", "text": ...}, {"type": "image",
"image": "imgs/0001.png"} (a path relative to the data file) and OpenAI's {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}} (a data URL; nothing is fetched from the
network). A prompt/completion row with an `images` list is the conversation `generate --image`
makes of it: a user turn holding the images, then the prompt; an assistant turn, the completion.
The conversation is rendered whole by the chat template with each image as the template's
placeholder, masked as any chat row (chat.encode_chat: assistant turns only), and each placeholder
then replaced by the run of image tokens the model's own processor makes of that image, never a
target. The images are read again when a batch needs their pixels (pixel_inputs), so a set holds
paths (or a row's data URLs) and tokens, not pixels.
"""

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.data.chat import encode_chat, render_chat, tokens_with_offsets
from mlx_lora.data.examples import ExampleSet, check_same_format, encode_row
from mlx_lora.data.rows import Row, row_format
from mlx_lora.errors import UserError

IMAGE, IMAGE_URL, TEXT = "image", "image_url", "text"
AsText = Callable[[list[dict]], list[dict]]  # a numbered layout's messages, images as text tags (model/vision.py)
DATA_URL = "data:"
PARTS = (
    '{"type": "text", "text": string} or an image, {"type": "image", "image": "path"} or '
    '{"type": "image_url", "image_url": {"url": "data:..."}}'
)


@dataclass
class VisionExample:
    tokens: np.ndarray  # (T,) int32, each image as its processor's run of image tokens
    mask: np.ndarray  # (T,) bool: token t is a training target
    images: tuple[Path | str, ...]  # in the order their runs appear in `tokens`; a str is a data URL
    images_end: int = 0  # tokens up to the end of the last image's run (0: no image)


@dataclass(frozen=True, eq=False)
class VisionSet(ExampleSet):
    """An ExampleSet whose rows also name their images, so batches, masks and lengths read it as any set."""

    images: tuple[tuple[Path | str, ...], ...] = ()  # (N,): example i's images

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


def _image_path(where: str, path: str, root: Path | None) -> Path:
    if root is None:
        raise UserError(f"{where}: image paths are read relative to a JSONL data file; give --data a file or folder")
    return root / path


def _data_url(where: str, url) -> str:
    """An image_url's URL, which must be a data URL: mlx-lora reads no image from the network."""
    if not isinstance(url, str):
        raise UserError(f'{where} must be {{"type": "image_url", "image_url": {{"url": "data:..."}}}}, got {url!r:.60}')
    if not url.startswith(DATA_URL):
        raise UserError(
            f"{where}: image_url {url:.60}: only data URLs (data:image/png;base64,...) are read; images are "
            "not fetched from the network: download it and give its path as an image part"
        )
    return url


def _image_part(where: str, part, root: Path | None) -> Path | str | None:
    """The image a content part names (None for a text part); a part of another shape is an error."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == TEXT and isinstance(part.get("text"), str):
        return None
    if kind == IMAGE and isinstance(part.get(IMAGE), str):
        return _image_path(where, part[IMAGE], root)
    if kind == IMAGE_URL and isinstance(part.get(IMAGE_URL), dict):
        return _data_url(where, part[IMAGE_URL].get("url"))
    raise UserError(f"{where} must be {PARTS}, got {part!r:.60}")


def _root(where: str) -> Path | None:
    file = data_file(where)
    return None if file is None else file.parent


def _completion_images(where: str, fields: dict) -> tuple[dict, dict, list[Path]]:
    """split_images of a prompt/completion row with an `images` list: the conversation `generate
    --image` makes of it, the images first in the user turn, the completion the assistant's."""
    if "messages" in fields or "text" in fields:
        raise UserError(
            f"{where}: an 'images' list goes with prompt and completion; in a messages row put each image "
            'in its user turn as {"type": "image", "image": "path"}'
        )
    row_format(where, fields)  # a prompt and a completion, strings
    images = fields["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise UserError(f"{where}: key 'images' must be a list of image paths (relative to the data file)")
    found = [_image_path(f"{where}: images[{i}]", p, _root(where)) for i, p in enumerate(images)]
    content = [{"type": IMAGE} for _ in found] + [{"type": TEXT, "text": fields["prompt"]}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": fields["completion"]}]
    return {"messages": messages}, fields, found


def split_images(where: str, fields: dict) -> tuple[dict, dict, list[Path]]:
    """(the row for the template: image parts as {"type": "image"}; the row as the text checks read
    it, each content list as its text; the images in order)."""
    if "images" in fields:
        return _completion_images(where, fields)
    messages = fields.get("messages")
    if not isinstance(messages, list):
        return fields, fields, []
    root = _root(where)
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


def _data_url_bytes(url: str) -> BytesIO:
    """A base64 data URL's bytes (data:[<type>][;base64],<data>)."""
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise ValueError("not a base64 data URL (data:image/png;base64,...)")
    return BytesIO(base64.b64decode(data, validate=True))


def open_image(where: str, source: Path | str):
    """The image (a path, or a data URL) as RGB, decoded now so a broken one is refused here, naming its row."""
    from PIL import Image  # the vision extra's

    url = isinstance(source, str)
    name = f"image_url {source:.40}..." if url else f"image {source}"
    try:
        with Image.open(_data_url_bytes(source) if url else source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{where}: {name}: no such file (image paths are relative to the data file)") from None
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as e:
        why = f"cannot read it ({e}); give a PNG, JPEG or other image Pillow reads"
        raise UserError(f"{where}: {name}: {why}") from None


def image_from_url(where: str, url) -> Any:
    """An image_url's image, RGB: a data URL decoded (an http(s) URL is refused, nothing is fetched)."""
    return open_image(where, _data_url(where, url))


def expand_images(where: str, tokens, mask, images: list[Path | str], processor, image_token: str) -> tuple:
    """Each of the template's image placeholders replaced by its image's run of tokens (masked out), and
    where the last run ends."""
    stray = getattr(processor, "image_token", image_token)  # the features' token: Gemma 3's <image_soft_token>
    if stray != image_token and (tokens == processor.tokenizer.convert_tokens_to_ids(stray)).any():
        raise UserError(
            f"{where}: its text holds {stray!r}, the token this model reads an image's features into; leave it out"
        )
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
    end = sum(len(t) for t in out_tokens)
    out_tokens.append(tokens[start:])
    out_mask.append(mask[start:])
    return np.concatenate(out_tokens), np.concatenate(out_mask), end


def _numbered_runs(where: str, ids: np.ndarray, count: int) -> list[tuple[int, int]]:
    """[start, end) of each text chunk's tokens in a numbered processor's ids, around its image runs."""
    chunks, at = [], 0
    for n in range(1, count + 1):
        run = np.flatnonzero(ids[at:] < 0)
        if not len(run) or ids[at + run[0]] != -n:
            raise UserError(f"{where}: the processor did not write image {n}'s tokens where its tag is")
        start = at + run[0]
        chunks.append((at, start))
        at = start + int(np.argmax(np.append(ids[start:] != -n, True)))
    return [*chunks, (at, len(ids))]


def expand_numbered(where: str, rendered, images: list[Path | str], tokenizer, processor, image_token: str, **masking):
    """Phi-3-vision's scheme (Layout.numbered): the processor turns the rendered text, images written
    as numbered tags, into its ids, image N a run of -N; each text chunk's ids are the tail of that
    chunk tokenized alone (mlx-vlm's processor drops a chunk's first token after an image), which
    places the mask's character offsets on them. Image tokens are never targets."""
    tag = re.compile(re.escape(image_token).replace(re.escape("{}"), r"\d+"))
    tags = tag.findall(rendered.text)
    if tags != [image_token.format(n) for n in range(1, len(images) + 1)]:
        raise UserError(
            f"{where}: {len(images)} image part(s) but the text holds the image tags {tags}; give each image "
            f"as one image part and leave tags such as {image_token.format(1)!r} out of the text"
        )
    try:
        ids = np.asarray(processor(text=rendered.text, images=[open_image(where, p) for p in images])["input_ids"])[0]
    except ValueError as e:
        raise UserError(f"{where}: the model's processor refused this row: {e}") from None
    offsets = np.zeros((len(ids), 2), np.int64)  # image tokens: no characters
    bounds = [0] + [end for m in tag.finditer(rendered.text) for end in (m.start(), m.end())] + [len(rendered.text)]
    for i, (a, b) in enumerate(_numbered_runs(where, ids, len(images))):
        chunk, at = rendered.text[bounds[2 * i] : bounds[2 * i + 1]], bounds[2 * i]
        alone, places = tokens_with_offsets(where, tokenizer, chunk, special=i == 0)
        if b - a > len(alone) or not np.array_equal(alone[len(alone) - (b - a) :], ids[a:b]):
            raise UserError(f"{where}: the processor's tokens of the text around an image are not the tokenizer's")
        offsets[a:b] = places[len(alone) - (b - a) :] + at
    mask = rendered.mask(offsets, **masking) & (ids >= 0)
    return ids.astype(np.int32), mask


def encode_vision_row(
    where: str, fields: dict, tokenizer, processor, image_token: str, as_text: AsText | None = None, **masking
) -> tuple[VisionExample, str]:
    """A row's tokens, mask and images, and its row format; a row without images is encoded as for a
    text model. `as_text`: a numbered layout's messages with their images as text tags (Layout.as_text)."""
    template, checked, images = split_images(where, fields)
    fmt = row_format(where, checked)
    if not images and template is checked:  # no image, and no conversation made of a prompt/completion row
        ex = encode_row(where, tokenizer, fmt, fields, **masking)
        return VisionExample(ex.tokens, ex.mask, ()), fmt
    if as_text is not None:
        rendered = render_chat(where, tokenizer, {**template, "messages": as_text(template["messages"])})
        tokens, mask = expand_numbered(where, rendered, images, tokenizer, processor, image_token, **masking)
        runs = np.flatnonzero(tokens < 0)  # image N's tokens are -N
        end = int(runs[-1]) + 1 if len(runs) else 0
    else:
        tokens, mask = encode_chat(where, tokenizer, template, **masking)
        tokens, mask, end = expand_images(where, tokens, mask, images, processor, image_token)
    mask[:1] = False  # nothing predicts the first token (never an image's: those are never targets)
    return VisionExample(tokens, mask, tuple(images), end), fmt


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
    as_text: AsText | None = None,
) -> VisionSet:
    """Rows -> examples. A row longer than --max-seq-length is cut there when the cut leaves its
    images whole, else refused (an image's tokens are all the model reads of it). `as_text`: see
    encode_vision_row."""
    examples, first, truncated, count = [], None, 0, 0
    masking = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
    for row in rows:
        count += 1
        ex, fmt = encode_vision_row(row.where, row.fields, tokenizer, processor, image_token, as_text, **masking)
        first = first or (fmt, row)
        check_same_format(row, fmt, *first)
        if len(ex.tokens) > max_seq_length:
            if ex.images_end > max_seq_length:
                raise UserError(
                    f"{row.where}: its images end at token {ex.images_end}, past --max-seq-length "
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


def pixel_inputs(processor, images: list[Path | str]) -> dict[str, np.ndarray]:
    """What the model's vision tower reads for `images` (paths or data URLs), in order, from the model's
    own image processor (Qwen2-VL: pixel_values (patches, C·t·p·p) and image_grid_thw (images, 3))."""
    out = processor.image_processor(images=[open_image("a row's image", p) for p in images])
    return {k: np.asarray(v) for k, v in out.items()}
