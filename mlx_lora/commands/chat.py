"""`mlx-lora chat`: a conversation in the chat template, streamed, with adapters switched on the fly.

Lines starting with '/' are commands; everything else is the user's next turn. Switching the
adapter keeps the conversation, so the same history can be answered by another adapter.
"""

import mlx.core as mx

from mlx_lora.config import ChatConfig
from mlx_lora.errors import UserError
from mlx_lora.inference.adapter_set import AdapterSet, load_adapters
from mlx_lora.inference.generation import chat_tokens, require_chat_template, stream
from mlx_lora.model.vision import require_text

HELP = (
    "commands: /adapter NAME (answer with that adapter), /adapter (list them), /base (no adapter), "
    "/reset (start a new conversation), /quit"
)


def chat(cfg: ChatConfig, read=input, write=print) -> None:
    """Read turns with `read(prompt)` until /quit or end of input; stream replies through `write`."""
    loaded = load_adapters(cfg)
    require_text(loaded.base, "chat")
    require_chat_template(loaded.base)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
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
                messages = list(start)
                write("new conversation")
            else:
                switch(loaded, command, argument.strip(), write)
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for response in stream(loaded.base, chat_tokens(loaded.base, messages), cfg):
            write(response.text, end="", flush=True)
            reply.append(response.text)
        write()
        messages.append({"role": "assistant", "content": "".join(reply)})


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
