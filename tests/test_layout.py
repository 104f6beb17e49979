"""The house rules of ARCHITECTURE.md, checked: rooms import only the rooms beneath them, no
module imports one that imports it back, no function runs past 60 lines without a reason, and the
map names every module and nothing that is gone."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_lora"
ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"
CITED = re.compile(r"`(\w+)/(\w+)\.(\w+)")  # `room/module.name`, as the map cites code
# Each room and the rooms it may import (besides itself). Lower rooms never import higher ones.
FOUNDATION = {"errors", "atomic", "blas", "allocator", "machine", "config"}
MAY_IMPORT = {
    "errors": set(),
    "machine": set(),
    "atomic": {"errors"},
    "blas": {"errors"},
    "allocator": set(),
    "config": {"errors"},
    "model": FOUNDATION,
    "data": FOUNDATION,
    "reporting": FOUNDATION,
    "distributed": FOUNDATION | {"data"},
    "formats": FOUNDATION | {"model"},
    "inference": FOUNDATION | {"model", "formats", "reporting"},
    "training": FOUNDATION | {"model", "data", "formats", "reporting", "distributed"},
    "hub": FOUNDATION | {"formats", "reporting"},
    "commands": FOUNDATION | {"model", "data", "formats", "reporting", "inference", "training", "hub"},
    "cli": FOUNDATION | {"commands", "distributed", "inference", "reporting", "training"},
    "__init__": {"blas"},
}
# Commands do not import each other; a command may import the helper modules that are its own parts.
COMMAND_PARTS = {
    "mlx_lora.commands.fuse": {"mlx_lora.commands.shard_fuse", "mlx_lora.commands.vision_fuse"},  # --by-shard, VLMs
    "mlx_lora.commands.evaluate": {"mlx_lora.commands.preference_eval"},  # --task preference
}
LONG_FUNCTION = 60  # lines; a longer one says why in a `# long:` comment on its first line


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def imports(path: Path, source: str | None = None) -> set[str]:
    """Every mlx_lora module this file (or `source` in its place) imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_lora"):
            assert node.level == 0, f"{path}: relative import; the house uses absolute mlx_lora.* imports"
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlx_lora")}
    known = modules()
    return {m for m in found if m in known and m != "mlx_lora"}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_rooms_import_only_the_rooms_beneath_them():
    wrong = [
        f"{module} imports {target}"
        for module, path in modules().items()
        for target in imports(path)
        if room(target) != room(module) and room(target) not in MAY_IMPORT[room(module)]
    ]
    assert not wrong, wrong


def sideways(module: str, targets: set[str]) -> list[str]:
    """A command's imports of other commands that are not its own parts."""
    return [
        f"{module} imports {t}"
        for t in sorted(targets)
        if room(module) == room(t) == "commands" and t != module and t not in COMMAND_PARTS.get(module, set())
    ]


def test_commands_do_not_import_each_other():
    wrong = [line for module, path in modules().items() for line in sideways(module, imports(path))]
    assert not wrong, wrong


def test_the_commands_check_refuses_a_planted_sideways_import():
    fuse = modules()["mlx_lora.commands.fuse"]
    planted = fuse.read_text() + "\nfrom mlx_lora.commands.upload import upload\n"
    assert sideways("mlx_lora.commands.fuse", imports(fuse, planted)) == [
        "mlx_lora.commands.fuse imports mlx_lora.commands.upload"
    ]
    # a part is its own command's only: evaluate may not import fuse's
    part = "from mlx_lora.commands.shard_fuse import adapted\n"
    assert sideways("mlx_lora.commands.evaluate", imports(fuse, part)) == [
        "mlx_lora.commands.evaluate imports mlx_lora.commands.shard_fuse"
    ]
    assert sideways("mlx_lora.commands.fuse", imports(fuse, part)) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: imports(p) for m, p in modules().items()}
    cycles = set()

    def visit(module: str, path: list[str]) -> None:
        for target in graph[module]:
            if target in path:
                cycles.add(" -> ".join(path[path.index(target) :] + [target]))
            elif len(path) < len(graph):
                visit(target, path + [target])

    for module in graph:
        visit(module, [module])
    assert not cycles, sorted(cycles)


def test_every_room_is_known_and_every_function_is_short_or_says_why():
    assert {room(m) for m in modules()} <= set(MAY_IMPORT) | {"default_model", "default_data"}
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG_FUNCTION and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_ruff_lint_and_format_are_clean():
    """pyproject.toml's ruff rules (with the complexity bound) and its formatting, over the whole repo."""
    repo = PACKAGE.parent
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        run = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=repo, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def defined(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, constants) and in its classes."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def stale_and_missing(text: str) -> tuple[list[str], list[str]]:
    """(what the map cites that the code lacks, the modules it never names). Each room's row of the
    table names the room's modules as `module.py`; `room/module.name` anywhere names a definition."""
    stale, rows = [], {}
    for line in text.splitlines():
        if m := re.match(r"\| `(\w+)(?:/|\.py)` \|", line):
            rows[m[1]] = line
    for room_name, row in rows.items():
        folder = PACKAGE / room_name
        stale += [
            f"{room_name}/{n}"
            for n in re.findall(r"`(\w+\.py)`", row)
            if folder.is_dir() and not (folder / n).is_file()
        ]
    for room_name, module, name in CITED.findall(text):
        inside = (PACKAGE / room_name).is_dir()  # else a repository path such as `tests/conftest.py`
        path = (PACKAGE if inside else PACKAGE.parent) / room_name / f"{module}.py"
        if not path.is_file() or (name != "py" and name not in defined(path)):
            stale.append(f"{room_name}/{module}.{name}")
    missing = [
        module
        for module, path in modules().items()
        if path.name != "__init__.py"
        and not (f"`{path.name}`" in rows.get(room(module), "") if path.parent != PACKAGE else path.stem in rows)
    ]
    return stale, missing


def test_the_map_names_every_module_and_nothing_that_is_gone():
    stale, missing = stale_and_missing(ARCHITECTURE.read_text())
    assert not stale, f"ARCHITECTURE.md cites what the code no longer has: {stale}"
    assert not missing, f"ARCHITECTURE.md's table does not name: {missing}"


def test_the_map_check_catches_a_stale_name_and_an_unnamed_module():
    text = ARCHITECTURE.read_text()
    planted = text + "\n`data/rows.resolve_data` reads the data.\n"
    assert stale_and_missing(planted)[0] == ["data/rows.resolve_data"]
    assert stale_and_missing(text.replace("`mapping.py`", "mapping"))[1] == ["mlx_lora.data.mapping"]
