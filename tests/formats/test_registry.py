"""The one registry of adapter formats: read_adapter, convert and upload walk it, and the docs'
table of formats says what it says."""

import re
from dataclasses import fields, replace
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import random_adapter

from mlx_lora.commands.convert import convert
from mlx_lora.config import ConvertConfig, LoRAConfig
from mlx_lora.config.commands import CONVERT_FORMATS
from mlx_lora.errors import UserError
from mlx_lora.formats import registry
from mlx_lora.formats.loader import read_adapter
from mlx_lora.formats.native import read_native
from mlx_lora.formats.registry import FORMATS, Format, detect, format_named

DOCS = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
ROW = re.compile(r"\| `[\w-]+` \| .+ \| (?:yes|no) \| .+ \| .+ \|")


def fields_of(cls) -> dict:
    return {f.name: f for f in fields(cls)}


def table_rows(formats) -> list[str]:
    """docs/adapters.md's table of formats, as the registry would write it."""
    return [
        f"| `{f.name}` | {f.what}: {', '.join(f'`{n}`' for n in f.files)} | {'yes' if f.read else 'no'} | "
        f"{f'`{f.hub_dir}/`' if f.hub_dir else 'at the root'} | {f.used_by} |"
        for f in formats
    ]


def docs_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if ROW.fullmatch(line)]


def test_the_docs_table_of_formats_is_the_registry():
    assert docs_rows(DOCS.read_text()) == table_rows(FORMATS)


def test_the_docs_check_sees_a_format_the_docs_leave_out():
    planted = (*FORMATS, replace(FORMATS[1], name="safetensors-v2", hub_dir="v2"))
    assert docs_rows(DOCS.read_text()) != table_rows(planted)


def test_convert_takes_every_format_the_registry_writes_in_its_order():
    assert tuple(f.name for f in FORMATS) == CONVERT_FORMATS
    help_text = fields_of(ConvertConfig)["to"].metadata["help"]
    assert all(f"{name} (" in help_text for name in CONVERT_FORMATS)


def test_each_format_written_is_told_apart_as_itself(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8))
    for fmt in FORMATS:
        out = tmp_path / fmt.name
        convert(ConvertConfig(str(tmp_path / "ours"), str(out), to=fmt.name), log=lambda _: None)
        assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == set(fmt.files)
        found = detect(out)
        assert (found[0] if found else None) is (fmt if fmt.read else None), fmt.name


def test_a_new_format_is_one_entry(llama, tmp_path, monkeypatch):
    """A format appended to FORMATS is read by read_adapter and written by convert, nothing else changed."""
    random_adapter(llama, tmp_path / "ours", LoRAConfig(targets="q_proj", num_layers=1, rank=2, alpha=2))
    marker = "planted.txt"

    def write(out: Path, e: registry.Export) -> None:
        format_named("mlx").write(out, e)
        (out / marker).write_text("planted")

    planted = Format(
        name="planted",
        detect=lambda p: (p.directory / marker).is_file(),
        read=lambda p: read_native(p.directory, p.config),
        write=write,
        needs=registry.NOTHING,
        files=(marker,),
        hub_dir="planted",
        what="a test's format",
        used_by="this test",
    )
    monkeypatch.setattr(registry, "FORMATS", (planted, *FORMATS))
    convert(ConvertConfig(str(tmp_path / "ours"), str(tmp_path / "out"), to="planted"), log=lambda _: None)
    assert (tmp_path / "out" / marker).is_file()
    assert detect(tmp_path / "out")[0] is planted
    config, weights = read_adapter(tmp_path / "out")
    want_config, want = read_adapter(tmp_path / "ours")
    assert config.modules == want_config.modules
    assert all(mx.array_equal(weights[k], want[k]).item() for k in want)


def test_a_directory_no_format_claims_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json here; point --adapter-path at a directory"):
        read_adapter(tmp_path)
