"""The `wsa` command as a user meets it: help texts, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsa.cli import main

COMMANDS = sorted(main.commands)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_top_level_help_lists_commands() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for name in ("ingest", "info", "synth"):
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_example(command: str) -> None:
    code, out, _ = run(command, "--help")
    assert code == 0
    assert "Example" in out and f"wsa {command}" in out


def test_synth_ingest_info_round(tmp_path: Path) -> None:
    loras, space = tmp_path / "loras", tmp_path / "space"
    assert run("synth", str(loras), "--n", "4", "-q")[0] == 0
    code, out, _ = run("ingest", str(loras), "--out", str(space), "-q")
    assert code == 0 and "4 adapters × 99648 features" in out
    code, out, _ = run("info", str(space), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["n_rows"] == 4 and summary["modules"]["count"] == 64 and summary["formats"] == {"peft": 4}
    code, out, _ = run("info", str(space))
    assert code == 0 and "64" in out and "r=1: 64" in out
    code, out, _ = run("info", str(loras), "--json", "-q")
    groups = json.loads(out)["groups"]
    assert len(groups) == 1 and groups[0]["count"] == 4
    code, out, _ = run("info", str(loras / "id_0" / "unet"))
    assert code == 0 and "peft" in out and "attn2.to_v" in out


def test_bad_input_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "loras" / "broken.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run("ingest", str(tmp_path / "loras"), "--out", str(tmp_path / "s"), "-q")
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.safetensors" in lines[0]
    assert "Traceback" not in err


def test_usage_error_exit_2(tmp_path: Path) -> None:
    code, _, _ = run("ingest", str(tmp_path), "--out", str(tmp_path / "s"), "--repr", "nope")
    assert code == 2
    code, _, err = run("ingest", str(tmp_path), "--out", str(tmp_path / "s"), "--alpha", "3")
    assert code == 2 and "--layout" in err


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_export_rows_load_back_exactly(tmp_path: Path, fmt: str) -> None:
    import torch

    import wsa

    loras, space = tmp_path / "loras", tmp_path / "space"
    run("synth", str(loras), "--n", "3", "-q")
    run("ingest", str(loras), "--out", str(space), "--repr", "canonical", "-q")
    code, out, _ = run("export", str(space), "--ids", "id_1", "--format", fmt, "--out", str(tmp_path / "x"))
    assert code == 0
    exported = wsa.load_adapter(out.strip())
    original = wsa.load_adapter(loras / "id_1" / "unet")
    for name in original.modules:
        torch.testing.assert_close(exported.delta(name), original.delta(name), atol=1e-6, rtol=1e-5)
