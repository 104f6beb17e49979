"""A plain `pip install mlx-lora` (no extras) imports every module and answers every command.

The test venv has every extra installed, which once hid a core module that imported `gguf` (then
only in the test extra): the README's first command failed on a fresh machine while CI was green.
Here a child process hides every package that only an extra brings, as a plain install lacks them."""

import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import tomllib

import mlx_lora
from mlx_lora.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0]).lower()


def _closure(names: set[str]) -> set[str]:
    """The distributions `names` need, transitively, as installed here (environment markers aside:
    counting a marker-guarded need only hides less)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def extra_only_modules() -> list[str]:
    """Top-level modules whose every distribution comes only with an extra of ours."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _closure({_name(d) for d in project["dependencies"]})
    extras = _closure({_name(d) for ds in project["optional-dependencies"].values() for d in ds}) - core
    return sorted(
        module
        for module, dists in packages_distributions().items()
        if {_name(d) for d in dists} <= extras and module.isidentifier()
    )


CHILD = """
import importlib, json, pkgutil, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # `import name` raises ImportError, as on a plain install
import mlx_lora
for m in pkgutil.walk_packages(mlx_lora.__path__, "mlx_lora."):
    importlib.import_module(m.name)
from typer.testing import CliRunner
from mlx_lora.cli import app
for command in sys.argv[2].split(","):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, (command, result.output)
# a GGUF base: its tokenizer converted without transformers' torch-only GGUF reader
result = CliRunner().invoke(app, ["generate", "--model", sys.argv[4], "--prompt", "Hi", "--max-tokens", "2"])
assert result.exit_code == 0, result.output
for name, args in [
    ("serve", ["serve"]),
    ("datasets", ["info", "--data", "someone/a-dataset"]),
    ("tensorboard", ["train", "--iters", "1", "--report-to", "tensorboard", "--adapter-path", sys.argv[3]]),
    ("vision", ["generate", "--model", sys.argv[5], "--prompt", "Hi"]),
]:
    result = CliRunner().invoke(app, args)
    print(json.dumps([name, result.exit_code, result.output]))
"""


def test_plain_install_imports_every_module_and_answers_every_help(tmp_path, smollm2_gguf):
    hidden = extra_only_modules()
    # the extras' own packages are hidden (a sanity check of the computation, not of mlx-lora)
    assert {"fastapi", "uvicorn", "datasets", "torch", "peft", "llama_cpp", "mlx_vlm", "PIL"} <= set(hidden), hidden
    vlm = tmp_path / "vlm"  # a vision-language model's directory: its config.json is all that is read
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {"depth": 1}}))
    assert "gguf" not in hidden and "mlx_lm" not in hidden
    commands = [c.name for c in app.registered_commands]
    assert {"train", "generate", "chat", "eval", "fuse", "convert", "info", "plot", "serve", "upload"} <= set(commands)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            ",".join(hidden),
            ",".join(commands),
            str(tmp_path / "run"),
            str(smollm2_gguf),
            str(vlm),
        ],
        capture_output=True,
        text=True,
        cwd=Path(mlx_lora.__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # each optional feature without its extra: exit 2 and one line that says what to install
    answers = {name: (code, output) for name, code, output in map(json.loads, done.stdout.splitlines()[-4:])}
    for feature, install in [
        ("serve", 'pip install "mlx-lora[serve]"'),
        ("datasets", 'pip install "mlx-lora[datasets]"'),
        ("tensorboard", "pip install tensorboardX"),
        ("vision", 'pip install "mlx-lora[vision]"'),
    ]:
        code, output = answers[feature]
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and install in errors[0] and "Traceback" not in output, (feature, output)
    assert not (tmp_path / "run").exists()  # refused before anything was written
