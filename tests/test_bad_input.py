"""Every bad input through the real `mlx-lora` command: exit 2, one `error:` line naming the
file:line or key, no traceback, and a previously written adapter left byte for byte as it was."""

import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.training.checkpoint import OPTIMIZER_STATE, checkpoint_dir

GOOD_ROW = {"prompt": "Q: 1 + 1?\nA:", "completion": " 2"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, hf_models):
    """A workspace: the models, and an adapter (with checkpoints) trained before the bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    write_jsonl(root / "data" / "train.jsonl", [GOOD_ROW] * 4)
    write_jsonl(root / "data" / "valid.jsonl", [GOOD_ROW] * 2)
    result = _run(
        [
            "train",
            "--model",
            str(hf_models["llama"]),
            "--data",
            str(root / "data"),
            "--adapter-path",
            str(root / "adapter"),
            "--iters",
            "2",
            "--save-every",
            "1",
            "--num-layers",
            "2",
            "--val-every",
            "0",
        ]
    )
    assert result.exit_code == 0, result.output
    torn = root / "torn"
    shutil.copytree(root / "adapter", torn)
    (torn / ADAPTER_WEIGHTS).write_bytes((torn / ADAPTER_WEIGHTS).read_bytes()[:200])
    optimizer = checkpoint_dir(torn, 1) / OPTIMIZER_STATE
    optimizer.write_bytes(optimizer.read_bytes()[:-50])
    reshaped = root / "reshaped"  # same base, but tensors of another rank than the config says
    shutil.copytree(root / "adapter", reshaped)
    config = json.loads((reshaped / ADAPTER_CONFIG).read_text())
    (reshaped / ADAPTER_CONFIG).write_text(json.dumps({**config, "rank": 4}))
    weights = reshaped / ADAPTER_WEIGHTS  # as an adapter saved without its config copy would be
    mx.save_safetensors(str(weights), mx.load(str(weights)))
    (root / "torn_model").mkdir()
    for f in hf_models["llama"].iterdir():
        shutil.copy(f, root / "torn_model" / f.name)
    weights = root / "torn_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "a_file").write_text("")
    return dict(root=root, llama=hf_models["llama"], qwen2=hf_models["qwen2"])


def _run(args):
    return CliRunner().invoke(app, args)


def _data(root: Path, name: str, train=None, valid=(GOOD_ROW,), raw=None) -> str:
    d = root / name
    if raw is not None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.jsonl").write_text(raw)
    elif train is not None:
        write_jsonl(d / "train.jsonl", train)
    if valid is not None:
        write_jsonl(d / "valid.jsonl", valid)
    return str(d)


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _train(ws, *extra, data=None):
    return [
        "train",
        "--model",
        str(ws["llama"]),
        "--data",
        data or str(ws["root"] / "data"),
        "--adapter-path",
        str(ws["root"] / "adapter"),
        "--iters",
        "2",
        "--val-every",
        "0",
        *extra,
    ]


CASES = {
    "malformed JSON line": lambda ws: (
        _train(ws, data=_data(ws["root"], "json", raw='{"text": "a"}\n{"text": "b"\n')),
        "train.jsonl:2: not valid JSON",
    ),
    "no known key": lambda ws: (
        _train(ws, data=_data(ws["root"], "keys", [{"question": "q"}])),
        "train.jsonl:1: row has none of the keys",
    ),
    "mixed formats in one file": lambda ws: (
        _train(ws, data=_data(ws["root"], "mixed", [{"text": "a"}, GOOD_ROW])),
        "train.jsonl:2: completion row, but line 1 is a text row",
    ),
    "empty split": lambda ws: (_train(ws, data=_data(ws["root"], "empty", raw="\n")), "train.jsonl: no rows"),
    "missing split": lambda ws: (
        # without a validation split a fraction of train is held out (issue 17); one row is too few
        _train(ws, data=_data(ws["root"], "missing", [GOOD_ROW], valid=None)),
        "train: 1 row, too few to hold out a validation set; add a validation split",
    ),
    "chat roles out of order": lambda ws: (
        _train(ws, data=_data(ws["root"], "order", [{"messages": [{"role": "assistant", "content": "hi"}]}])),
        "train.jsonl:1: messages[0] has role 'assistant' where 'user' belongs",
    ),
    "chat without assistant turn": lambda ws: (
        _train(ws, data=_data(ws["root"], "noreply", [{"messages": [{"role": "user", "content": "hi"}]}])),
        "train.jsonl:1: 'messages' has no assistant turn",
    ),
    "rows all longer than --max-seq-length": lambda ws: (
        _train(ws, "--max-seq-length", "4"),
        "train.jsonl:1: every row is longer than --max-seq-length 4",
    ),
    "unknown --targets": lambda ws: (
        _train(ws, "--targets", "qq_proj"),
        "--targets: 'qq_proj' matches no linear module in the selected blocks",
    ),
    "rank larger than a target": lambda ws: (
        _train(ws, "--rank", "100", "--targets", "q_proj", "--num-layers", "1"),
        "rank 100 is larger than model.layers.3.self_attn.q_proj allows (64x64): use 64 or less",
    ),
    "misspelled YAML key": lambda ws: (
        _train(ws, "--config", str(_yaml(ws["root"], "learnig_rate: 0.1\n"))),
        "run.yaml:1: unknown key 'learnig_rate' (did you mean 'learning_rate'?)",
    ),
    "generate: adapter from another base": lambda ws: (
        ["generate", "--model", str(ws["qwen2"]), "--adapter-path", str(ws["root"] / "adapter")],
        "adapter_config.json: adapter was trained on",
    ),
    "fuse: adapter from another base": lambda ws: (
        [
            "fuse",
            "--model",
            str(ws["qwen2"]),
            "--adapter-path",
            str(ws["root"] / "adapter"),
            "--save-path",
            str(ws["root"] / "fused"),
        ],
        "adapter_config.json: adapter was trained on",
    ),
    "resume: checkpoint from another base": lambda ws: (
        ["train", "--resume", str(ws["root"] / "adapter"), "--model", str(ws["qwen2"]), "--iters", "4"],
        "adapter_config.json: adapter was trained on",
    ),
    "adapter tensors of the wrong shape": lambda ws: (
        ["generate", "--adapter-path", str(ws["root"] / "reshaped")],
        "reshaped: adapter weights do not fit '"
        + str(ws["llama"].resolve())
        + "': model.layers.2.self_attn.q_proj.lora_a has shape (64, 8), the model needs (64, 4)",
    ),
    "truncated adapter safetensors": lambda ws: (
        ["generate", "--adapter-path", str(ws["root"] / "torn")],
        "adapters.safetensors: unreadable or truncated",
    ),
    "truncated optimizer state": lambda ws: (
        [
            "train",
            "--resume",
            str(checkpoint_dir(ws["root"] / "torn", 1)),
            "--adapter-path",
            str(ws["root"] / "adapter"),
        ],
        "optimizer.safetensors: unreadable or truncated",
    ),
    "truncated model safetensors": lambda ws: (
        _train(ws, "--model", str(ws["root"] / "torn_model")),
        "torn_model: mlx-lm cannot load it",
    ),
    "train: output directory not writable": lambda ws: (
        _train(ws)[:-6] + ["--adapter-path", str(ws["root"] / "a_file" / "out"), "--iters", "2"],
        "--adapter-path " + str(ws["root"] / "a_file" / "out") + ": cannot write there",
    ),
    "fuse: output directory not writable": lambda ws: (
        ["fuse", "--adapter-path", str(ws["root"] / "adapter"), "--save-path", str(ws["root"] / "a_file" / "fused")],
        "--save-path " + str(ws["root"] / "a_file") + ": cannot write there",
    ),
}


def _yaml(root: Path, text: str) -> Path:
    (root / "run.yaml").write_text(text)
    return root / "run.yaml"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_overwritten(ws, case):
    args, expected = CASES[case](ws)
    before = _snapshot(ws["root"] / "adapter")
    result = _run(args)
    lines = result.stderr.splitlines()  # the error alone: no `blas:` line before it
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output
    assert _snapshot(ws["root"] / "adapter") == before
    assert not (ws["root"] / "fused").exists()


@pytest.mark.parametrize(
    "bad",
    [["--model", "./no-such-dir"], ["--data", "no-such-data"], ["--targets", "nope"], ["--layers", "0,9"]],
)
def test_a_failed_run_creates_no_adapter_directory(ws, tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "adapter"
    args = ["train", "--model", str(ws["llama"]), "--data", str(ws["root"] / "data"), "--adapter-path", str(out)]
    result = _run([*args, *bad])
    assert result.exit_code == 2, result.output
    assert list(tmp_path.iterdir()) == []  # neither the adapter directory nor its parent, nor a probe


def test_the_writability_probe_leaves_nothing(tmp_path):
    from mlx_lora.atomic import check_writable
    from mlx_lora.errors import UserError

    check_writable(tmp_path / "a" / "b", "--adapter-path")
    check_writable(tmp_path, "--adapter-path")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write there"):
        check_writable(tmp_path / "file" / "out", "--adapter-path")


def _one_line_error(result, expected: str) -> None:
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def _users_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "thesis.txt").write_text("four years")
    (root / "sub" / "notes.md").write_text("# notes")
    return root


def test_no_command_replaces_a_directory_holding_files_it_did_not_write(ws, tmp_path):
    mine = _users_dir(tmp_path / "mine")
    before = _snapshot(mine)
    adapter = str(ws["root"] / "adapter")
    for args in (
        ["fuse", "--adapter-path", adapter, "--save-path", str(mine)],
        ["convert", adapter, str(mine)],
    ):
        result = _run(args)
        _one_line_error(result, f"{mine}: holds other files than mlx-lora {args[0]} wrote (sub, thesis.txt)")
        assert _snapshot(mine) == before


def test_fuse_and_convert_refuse_to_write_over_their_input(ws, tmp_path):
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(ws["root"] / "adapter", adapter)
    before = _snapshot(tmp_path)
    result = _run(["fuse", "--adapter-path", str(adapter), "--save-path", str(adapter)])
    _one_line_error(result, f"--save-path {adapter} is the input --adapter-path {adapter}; choose another directory")
    result = _run(["fuse", "--adapter-path", str(adapter), "--save-path", str(adapter.parent)])
    _one_line_error(result, f"--save-path {adapter.parent} holds the input --adapter-path {adapter}")
    result = _run(["convert", str(adapter), str(adapter.parent)])
    _one_line_error(result, f"OUT_DIR {adapter.parent} holds the input ADAPTER_DIR {adapter}")
    assert _snapshot(tmp_path) == before


def test_fuse_replaces_its_own_output_but_not_a_file_added_to_it(ws, tmp_path):
    fused, adapter = tmp_path / "fused", str(ws["root"] / "adapter")
    for _ in range(2):  # the second run replaces the first's output
        result = _run(["fuse", "--adapter-path", adapter, "--save-path", str(fused)])
        assert result.exit_code == 0, result.output
    (fused / "thesis.txt").write_text("four years")
    before = _snapshot(fused)
    result = _run(["fuse", "--adapter-path", adapter, "--save-path", str(fused)])
    _one_line_error(result, f"--save-path {fused}: holds other files than mlx-lora fuse wrote (thesis.txt)")
    assert _snapshot(fused) == before


def test_train_writes_its_own_files_only_and_leaves_the_users(ws, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(ws["root"] / "adapter", out)
    (out / "thesis.txt").write_text("four years")
    mine = _users_dir(tmp_path / "mine")  # train adds its files beside the user's, and replaces none of them
    for directory in (out, mine):
        before = _snapshot(directory)
        result = _run(_train(ws)[:-6] + ["--adapter-path", str(directory), "--iters", "1"])
        assert result.exit_code == 0, result.output
        assert {k: v for k, v in _snapshot(directory).items() if k in ("thesis.txt", "sub/notes.md")} == {
            k: v for k, v in before.items() if k in ("thesis.txt", "sub/notes.md")
        }
        assert (directory / ADAPTER_WEIGHTS).is_file()
    older = tmp_path / "older"  # an adapter without the record of who wrote it: not train's to overwrite
    older.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy(out / name, older / name)
    before = _snapshot(older)
    result = _run(_train(ws)[:-6] + ["--adapter-path", str(older), "--iters", "1"])
    _one_line_error(result, f"{older}: holds other files than mlx-lora train wrote (adapter_config.json, adapters")
    assert _snapshot(older) == before


def test_a_checkpoint_directory_holding_a_users_file_is_not_replaced(tmp_path):
    from mlx_lora.atomic import replace_dir
    from mlx_lora.errors import UserError

    step = tmp_path / "step-0000001"
    with replace_dir(step, "mlx-lora train", "--adapter-path") as tmp:
        (tmp / "a").write_text("1")
    with replace_dir(step, "mlx-lora train", "--adapter-path") as tmp:  # its own: replaced
        (tmp / "a").write_text("2")
    assert (step / "a").read_text() == "2"
    (step / "sub").mkdir()
    (step / "sub" / "mine").write_text("mine")
    refused = pytest.raises(UserError, match="holds other files than mlx-lora train wrote \\(sub\\)")
    with refused, replace_dir(step, "mlx-lora train", "--adapter-path") as tmp:
        (tmp / "a").write_text("3")
    assert (step / "a").read_text() == "2" and (step / "sub" / "mine").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]


class _FullDisk(io.FileIO):
    """A file on a disk with no room left: every write fails as the kernel's would."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk(monkeypatch) -> None:
    from mlx_lora import atomic

    def full_open(path, mode="r", *args, **kwargs):
        return _FullDisk(path, mode.replace("b", "")) if "w" in mode else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", full_open, raising=False)


def test_a_full_disk_keeps_the_old_adapter_says_so_and_leaves_nothing(ws, tmp_path, monkeypatch):
    from mlx_lora.errors import UserError
    from mlx_lora.formats.loader import read_adapter
    from mlx_lora.formats.native import write_adapter

    out = tmp_path / "adapter"
    shutil.copytree(ws["root"] / "adapter", out)
    config, weights = read_adapter(out)
    before = _snapshot(out)
    _full_disk(monkeypatch)
    with pytest.raises(UserError, match=f"^{out / ADAPTER_WEIGHTS}: cannot write it \\(no space left on device\\)"):
        write_adapter(out, config, weights)
    assert _snapshot(out) == before  # the old files, and no temporary beside them
    # the tokenized-row cache (on by default) would meet the full disk first, with the same one line
    result = _run(_train(ws)[:-6] + ["--adapter-path", str(out), "--iters", "1", "--no-data-cache"])
    _one_line_error(result, "adapters.safetensors: cannot write it (no space left on device); it was left as it was")
    assert {k: v for k, v in _snapshot(out).items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"
    }


def test_a_rename_is_followed_by_an_fsync_of_its_directory(tmp_path, monkeypatch):
    from mlx_lora import atomic

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    atomic.write_json(tmp_path / "a.json", {})
    assert events[-2:] == [("replace", str(tmp_path / "a.json")), ("fsync", str(tmp_path))]
    events.clear()
    with atomic.replace_dir(tmp_path / "d", "mlx-lora test", "--out") as tmp:
        (tmp / "f").write_text("")
    assert events[-2:] == [("replace", str(tmp_path / "d")), ("fsync", str(tmp_path))]


def _config(text: bytes):
    return lambda d: (d / ADAPTER_CONFIG).write_bytes(text)


def _embedded(value: str):
    def write(d: Path):
        weights, metadata = mx.load(str(d / ADAPTER_WEIGHTS), return_metadata=True)
        mx.save_safetensors(str(d / ADAPTER_WEIGHTS), weights, metadata={**metadata, "mlx_lora_config": value})

    return write


def _typed(**changes):
    def write(d: Path):
        config = json.loads((d / ADAPTER_CONFIG).read_text())
        (d / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
        _embedded(json.dumps({**config, **changes}))(d)  # the copy agrees, so the types are what is read

    return write


MLXLM = {"lora_parameters": {"rank": 8, "scale": 2.0}, "num_layers": 2}
MALFORMED_CONFIGS = {
    "{}": (_config(b"{}"), "differ from what adapters.safetensors was saved with"),
    "a list": (_config(b"[1, 2]"), "adapter_config.json: expected a JSON object"),
    "non-UTF-8 bytes": (_config(b'{"a": "\xff\xfe"}'), "adapter_config.json: not UTF-8 text (byte 7)"),
    "string format_version": (_typed(format_version="1"), "format_version must be a whole number, got '1'"),
    "modules not a list": (_typed(modules=5), "modules must be a list of strings, got 5"),
    "rank a string": (_typed(rank="8"), "rank must be a whole number, got '8'"),
    "mlx-lm rank a string": (
        _config(json.dumps({**MLXLM, "lora_parameters": {"rank": "x", "scale": 2.0}}).encode()),
        "adapter_config.json: rank must be a number, got 'x'",
    ),
    "embedded config not JSON": (
        _embedded("{"),
        "adapters.safetensors: its metadata mlx_lora_config is not valid JSON",
    ),
    "embedded config a list": (_embedded("[1]"), "adapters.safetensors: its metadata mlx_lora_config is not a JSON"),
}


@pytest.mark.parametrize("case", MALFORMED_CONFIGS)
def test_a_malformed_adapter_config_is_one_line(ws, tmp_path, case):
    damage, expected = MALFORMED_CONFIGS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(ws["root"] / "adapter", adapter)
    damage(adapter)
    result = _run(["generate", "--adapter-path", str(adapter), "--model", str(ws["llama"]), "--max-tokens", "1"])
    _one_line_error(result, expected)
