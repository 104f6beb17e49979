"""The `mlx-lora` command: flags are built from the config dataclasses; no ML logic here."""

import functools
import inspect
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional

import typer

from mlx_lora import allocator, blas
from mlx_lora.config import (
    PANELS,
    ChatConfig,
    ConvertConfig,
    EvalConfig,
    FuseConfig,
    GenerateConfig,
    PlotConfig,
    ServeConfig,
    TrainConfig,
    UploadConfig,
    build_config,
    field_types,
    load_yaml,
)
from mlx_lora.errors import Interrupted, UserError


class _NoHelpType:
    """typer 0.29 lists `--help` with a `<bool>` type; it takes no value, so show none."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_NoHelpType, typer.core.TyperCommand):
    pass


class _Group(_NoHelpType, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning on MLX: train an adapter, try it, merge it, ship it.",
)


OFF = "__off"  # the keyword of a boolean's opposite flag: dora__off for --no-dora


def _keyword(name: str, option, annotation) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _shown_default(default) -> str:
    if default is None or default is MISSING or default is False:
        return ""
    return f" (default: {'on' if default is True else default})"


def _flag(f, tp) -> list[inspect.Parameter]:
    """`--name VALUE`, or for a boolean `--name` plus its opposite: --no-name, listed only in the
    epilog so the help table keeps two columns, or a named one such as --dequantize, listed."""
    flag, panel = "--" + f.name.replace("_", "-"), f.metadata.get("panel")
    help = f.metadata["help"] + _shown_default(f.default)
    if tp is not bool:
        option = typer.Option(None, flag, help=help, show_default=False, rich_help_panel=panel)
        return [_keyword(f.name, option, Optional[tp])]
    off = f.metadata.get("off")
    on_option = typer.Option(None, flag, help=help, show_default=False, rich_help_panel=panel, metavar="")
    off_help = f"The opposite of {flag}." if off else None
    off_option = typer.Option(
        None,
        off or "--no-" + flag[2:],
        help=off_help,
        hidden=not off,
        show_default=False,
        rich_help_panel=panel,
        metavar="",
    )
    return [_keyword(f.name, on_option, Optional[bool]), _keyword(f.name + OFF, off_option, Optional[bool])]


def _options(cls) -> list[inspect.Parameter]:
    """One `--flag` per dataclass field; None means 'not given', so YAML and defaults can apply.
    Grouped by --help panel in PANELS order, the base model first in its panel."""
    order, types, params = [None, *PANELS], field_types(cls), []
    for f in sorted(fields(cls), key=lambda f: (order.index(f.metadata.get("panel")), f.name != "model")):
        if f.metadata.get("positional"):
            argument = typer.Argument(..., metavar=f.name.upper(), help=f.metadata["help"], show_default=False)
            params.append(_keyword(f.name, argument, types[f.name]))
        else:
            params += _flag(f, types[f.name])
    return params


def _merge_opposites(values: dict) -> dict:
    """{'dora': None, 'dora__off': True} -> {'dora': False}."""
    merged = {k: v for k, v in values.items() if not k.endswith(OFF)}
    for key, off in values.items():
        if key.endswith(OFF) and off:
            merged[key.removesuffix(OFF)] = False
    return merged


def _resumed_options(resume: str | None, init_adapter: str | None) -> dict:
    """`train --resume` reuses the checkpointed run's options; YAML and flags still override them.
    With --init-adapter too, the checkpoint is not read: TrainConfig refuses the pair."""
    if not resume or init_adapter:
        return {}
    from mlx_lora.training.checkpoint import saved_options

    return saved_options(resume)


def _command(cls, name: str, help: str, with_config: bool = False):
    """Register `fn(cfg)` as a command whose flags are the fields of `cls`."""

    def register(fn):
        @functools.wraps(fn)
        def run(**values):
            try:
                blas.check()  # a broken BLAS stops every command; `train` says which one it uses
                allocator.keep_freed_memory()
                values = _merge_opposites(values)
                config = values.pop("config", None)
                file_values = {
                    **_resumed_options(values.get("resume"), values.get("init_adapter")),
                    **(load_yaml(config, cls) if config else {}),
                }
                fn(build_config(cls, file_values, values))
            except UserError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
            except Interrupted as e:
                typer.echo(str(e), err=True)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        params = _options(cls)
        if with_config:
            option = typer.Option(None, "--config", help="YAML file with any of these options; flags override it.")
            params.insert(
                0,
                inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[Path]),
            )
        run.__signature__ = inspect.Signature(params)
        hidden = any(f.type in (bool, "bool") and not f.metadata.get("off") for f in fields(cls))
        epilog = "Each on/off flag --NAME also has an opposite, --no-NAME." if hidden else None
        return app.command(name, help=help, epilog=epilog, cls=_Command)(run)

    return register


@_command(TrainConfig, "train", "Train a LoRA adapter on a base model.", with_config=True)
def train(cfg: TrainConfig) -> None:
    from mlx_lora.distributed.group import peer_errors
    from mlx_lora.training.loop import train as run_training

    with peer_errors():
        run_training(cfg)


@_command(GenerateConfig, "generate", "Generate text with a base model, with or without one or several adapters.")
def generate(cfg: GenerateConfig) -> None:
    from mlx_lora.inference.adapter_set import load_adapters
    from mlx_lora.inference.cpp_engine import open_engine
    from mlx_lora.inference.generation import generate as run_generate
    from mlx_lora.inference.generation import speed_line

    engine = open_engine(cfg)
    if engine is None:
        responses = run_generate(load_adapters(cfg).base, cfg)
    else:
        typer.echo(engine.describe(), err=True)
        responses = engine.generate(cfg)
    # The prompt on stderr, so a terminal shows what the answer continues; stdout is the new text alone.
    typer.echo(cfg.prompt, err=True, nl=not sys.stdout.isatty())
    response = None
    for response in responses:
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        typer.echo(speed_line(response), err=True)


@_command(ChatConfig, "chat", "Chat with a model; /adapter NAME, /base and /reset switch on the fly.")
def chat(cfg: ChatConfig) -> None:
    from mlx_lora.commands.chat import chat as run_chat

    run_chat(cfg)


@_command(
    TrainConfig,
    "info",
    "What `train` would do with these options, without training: modules, trainable parameters, adapter size, memory.",
    with_config=True,
)
def info(cfg: TrainConfig) -> None:
    from mlx_lora.commands.info import info as show_info

    show_info(cfg)


@_command(PlotConfig, "plot", "Draw the loss curves of one or several training runs into one PNG.")
def plot(cfg: PlotConfig) -> None:
    from mlx_lora.reporting.plot import plot as draw

    draw(cfg)


@_command(FuseConfig, "fuse", "Merge an adapter into its base and save a standalone model.")
def fuse(cfg: FuseConfig) -> None:
    from mlx_lora.commands.fuse import fuse as run_fuse

    run_fuse(cfg)


@_command(ConvertConfig, "convert", "Rewrite an adapter as PEFT, mlx-lora or mlx-lm files.")
def convert(cfg: ConvertConfig) -> None:
    from mlx_lora.commands.convert import convert as run_convert

    run_convert(cfg)


@_command(
    UploadConfig, "upload", "Upload an adapter to the Hugging Face Hub: PEFT, mlx-lm and GGUF files and a model card."
)
def upload(cfg: UploadConfig) -> None:
    from mlx_lora.commands.upload import upload as run_upload

    run_upload(cfg)


@_command(EvalConfig, "eval", "Loss, perplexity and exact match on a data split; base vs adapter with --compare-base.")
def evaluate(cfg: EvalConfig) -> None:
    from mlx_lora.commands.evaluate import run
    from mlx_lora.reporting.progress import eprint
    from mlx_lora.reporting.results import table

    print(table(run(cfg, log=eprint)))  # stdout holds the results alone; progress goes to stderr


@_command(
    ServeConfig,
    "serve",
    "Serve the base and its adapters over the OpenAI HTTP API, all adapters in one batch.",
    with_config=True,
)
def serve(cfg: ServeConfig) -> None:
    from mlx_lora.commands.serve import serve as run_serve

    run_serve(cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
