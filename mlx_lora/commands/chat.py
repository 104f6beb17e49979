"""`mlx-lora chat`: a conversation in the chat template, streamed, with adapters switched on the fly.

Lines starting with '/' are commands; everything else is the user's next turn. Switching the
adapter keeps the conversation, so the same history can be answered by another adapter. On a
vision-language base, `/image PATH` attaches an image to the next user turn; every image of the
conversation is read again, by the model's own processor, for each reply.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_lora.config import ChatConfig
from mlx_lora.data.chat import as_parts
from mlx_lora.errors import UserError
from mlx_lora.inference.adapter_set import AdapterSet, load_adapters
from mlx_lora.inference.generation import (
    chat_text,
    chat_tokens,
    check_image,
    require_chat_template,
    stream,
    vision_responses,
)

HELP = (
    "commands: /adapter NAME (answer with that adapter), /adapter (list them), /base (no adapter), "
    "/image PATH (attach an image to your next turn; a vision-language model), "
    "/reset (start a new conversation), /quit"
)


@dataclass
class Conversation:
    messages: list[dict]
    images: list[str] = field(default_factory=list)  # every image of the turns so far, in order
    attached: list[str] = field(default_factory=list)  # /image's, for the next user turn
    parts: bool = False  # a vision-language base's: every turn a list of parts (SmolVLM's template reads no other)

    def add_user(self, text: str) -> None:
        """The user's turn, holding the attached images first, as `generate --image` puts them."""
        content = [{"type": "image"} for _ in self.attached] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content if self.attached or self.parts else text})
        self.images += self.attached
        self.attached = []

    def add_reply(self, text: str) -> None:
        reply = {"role": "assistant", "content": text}
        self.messages.append(as_parts(reply) if self.parts else reply)


def chat(cfg: ChatConfig, read=input, write=print) -> None:
    """Read turns with `read(prompt)` until /quit or end of input; stream replies through `write`."""
    loaded = load_adapters(cfg)
    require_chat_template(loaded.base)
    vision = loaded.base.processor is not None
    system = {"role": "system", "content": cfg.system}
    start = [as_parts(system) if vision else system] if cfg.system else []
    talk = Conversation(list(start), parts=vision)
    mx.random.seed(cfg.seed)

    write(status(loaded))
    write(HELP)
    while True:
        try:
            line = read(f"[{loaded.active or 'base'}] you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line[1:].partition(" ")
            if command in ("quit", "exit"):
                break
            if command == "reset":
                talk = Conversation(list(start), parts=vision)
                write("new conversation")
            elif command == "image":
                attach(loaded.base, talk, argument.strip(), write)
            else:
                switch(loaded, command, argument.strip(), write)
            continue
        talk.add_user(line)
        reply = []
        for response in responses(loaded.base, talk, cfg):
            write(response.text, end="", flush=True)
            reply.append(response.text)
        write()
        talk.add_reply("".join(reply))


def responses(base, talk: Conversation, cfg: ChatConfig):
    """The reply's pieces: mlx-lm's for a text model, mlx-vlm's with the conversation's images for a
    vision-language one."""
    if base.processor is None:
        return stream(base, chat_tokens(base, talk.messages), cfg)
    for image in talk.images:  # each reply reads them again: one gone since /image is one line
        check_image(Path(image), "/image")
    sampler = make_sampler(temp=cfg.temp, top_p=cfg.top_p)
    return vision_responses(base, chat_text(base, talk.messages), talk.images, cfg.max_tokens, sampler)


def attach(base, talk: Conversation, path: str, write) -> None:
    """/image PATH: the image, checked now, for the next user turn; else one line saying why not."""
    try:
        if base.processor is None:
            raise UserError(f"/image: {base.name} is a text model; give a vision-language --model (docs/vision.md)")
        if not path:
            raise UserError("/image needs a path: /image PATH")
        check_image(Path(path), "/image")
    except UserError as e:
        write(f"error: {e}")
        return
    talk.attached.append(path)
    write(f"{path} attached to your next turn")


def status(loaded: AdapterSet) -> str:
    names = ", ".join(loaded.names) or "none"
    return f"adapters: {names}; answering with: {loaded.active or 'the base model'}"


def switch(loaded: AdapterSet, command: str, argument: str, write) -> None:
    """/adapter NAME, /adapter and /base: switch (or list), then say what answers now."""
    try:
        if command == "adapter" and argument:
            loaded.set_adapter(argument)
        elif command == "base":
            loaded.set_adapter(None)
        elif command != "adapter":
            raise UserError(f"unknown command /{command}; {HELP}")
        write(status(loaded))
    except UserError as e:
        write(f"error: {e}")
