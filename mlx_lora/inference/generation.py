"""Run a base model, with or without an adapter, through mlx-lm's own streaming generation."""

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler

from mlx_lora.config import GenerateConfig, InferenceConfig
from mlx_lora.errors import UserError
from mlx_lora.model.base import Base
from mlx_lora.model.batch_generator import stream_sampler
from mlx_lora.model.vision import refuse_feature_token, template_messages
from mlx_lora.reporting.progress import Bar

LONG_PROMPT = 512  # tokens; shorter prompts are read too fast for a progress bar to help


def require_chat_template(base: Base) -> None:
    if not base.tokenizer.has_chat_template:
        raise UserError(
            f"{base.name}: the tokenizer has no chat template; use a chat model, or generate without --chat"
        )


def chat_text(base: Base, messages: list[dict[str, str]]) -> str:
    """The conversation in the tokenizer's chat template, ending where the assistant speaks next (a
    vision-language base's images as its template and processor read them: template_messages)."""
    require_chat_template(base)
    messages = template_messages(base.config, messages) if base.processor is not None else messages
    return base.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_tokens(base: Base, messages: list[dict[str, str]]) -> list[int]:
    return base.tokenizer.encode(chat_text(base, messages), add_special_tokens=False)


def prompt_tokens(base: Base, prompt: str, chat: bool) -> list[int]:
    if chat:
        return chat_tokens(base, [{"role": "user", "content": prompt}])
    return base.tokenizer.encode(prompt)


def stream(base: Base, tokens: list[int], cfg: InferenceConfig) -> Iterator[GenerationResponse]:
    """mlx-lm's responses (text piece, speeds, peak memory); a bar while a long prompt is read."""
    bar = Bar("reading prompt", len(tokens), transient=True) if len(tokens) >= LONG_PROMPT else None
    sampler = stream_sampler(cfg.temp, cfg.top_p)
    try:
        for response in stream_generate(
            base.model,
            base.tokenizer,
            tokens,
            max_tokens=cfg.max_tokens,
            sampler=sampler,
            prompt_progress_callback=lambda done, total: bar and bar.advance(0, completed=done),
        ):
            if bar:
                bar.close()  # the streamed text shows progress from here on
            yield response
    finally:
        if bar:
            bar.close()


def generate(base: Base, cfg: GenerateConfig) -> Iterator[GenerationResponse]:
    """mlx-lm's responses for `cfg.prompt`, seeded; `.text` is the next piece of text. A
    vision-language base generates through mlx-vlm (vision_stream)."""
    mx.random.seed(cfg.seed)
    if base.processor is not None:
        yield from vision_stream(base, cfg.prompt, cfg.image or [], cfg)
        return
    if cfg.image:
        raise UserError(f"--image: {base.name} is a text model; give a vision-language --model (docs/vision.md)")
    yield from stream(base, prompt_tokens(base, cfg.prompt, cfg.chat), cfg)


def check_image(path: Path, what: str = "--image") -> None:
    """A missing or unreadable image (`what` names where it was given) is one line, before any work
    (mlx-vlm would raise deep inside)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{what} {path}: cannot read it ({e}); give a PNG, JPEG or other image Pillow reads") from None


def vision_stream(base: Base, prompt: str, images: list[str], cfg: InferenceConfig) -> Iterator:
    """mlx-vlm's responses (`.text` as mlx-lm's) for one user turn holding `images` then `prompt`,
    in the chat template, each image read by the model's own processor."""
    for image in images:
        check_image(Path(image))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = chat_text(base, [{"role": "user", "content": content}])
    yield from vision_responses(base, text, images, cfg.max_tokens, make_sampler(temp=cfg.temp, top_p=cfg.top_p))


def vision_responses(base: Base, text: str, images: list, max_tokens: int, sampler) -> Iterator:
    """mlx-vlm's responses to `text`, a prompt already in the chat template with a placeholder per
    image, `images` (paths, or PIL images decoded from serve's data URLs; in order) read by the
    model's own processor: generate, chat, eval and serve."""
    from mlx_vlm.generate import stream_generate  # present: the base was loaded through it

    refuse_feature_token("the prompt", text, base.config, base.processor)
    read = [str(p) if isinstance(p, (str, Path)) else p for p in images] or None
    yield from stream_generate(base.model, base.processor, text, image=read, max_tokens=max_tokens, sampler=sampler)


def speed_line(response: GenerationResponse) -> str:
    return (
        f"{response.prompt_tokens} prompt tokens at {response.prompt_tps:.0f} tok/s, "
        f"{response.generation_tokens} generated at {response.generation_tps:.1f} tok/s, "
        f"peak memory {memory_text(response.peak_memory)}"
    )


def memory_text(gb: float) -> str:
    """mlx-lm's peak (MLX's own allocations, CPU or GPU, in GB) in a unit that shows it: a small
    model's few MB read '0.00 GB' before."""
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"
