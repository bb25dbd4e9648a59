"""Every bad input gives a one-line :class:`wsa.FormatError` naming the file and the problem.

Why one line: the CLI prints expected failures as ``<path>: <problem>`` and exits 1; a traceback
or a multi-line message from a third-party library means the error was not anticipated.
Each case has a positive control nearby (the same file without the defect loads), so a reader
that refused everything would fail here too.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

import wsa
from tests.tiny import save_safetensors

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def good_kohya() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{KEY}.lora_down.weight": torch.randn(4, 8, generator=g),
        f"{KEY}.lora_up.weight": torch.randn(8, 4, generator=g),
        f"{KEY}.alpha": torch.tensor(2.0),
    }


def expect_error(path: Path, *fragments: str, blame: Path | None = None) -> wsa.FormatError:
    """Load ``path``; assert a one-line FormatError naming ``blame`` (default ``path``) and each fragment."""
    with pytest.raises(wsa.FormatError) as info:
        wsa.load_adapter(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(blame or path)), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return info.value


@pytest.fixture
def kohya_file(tmp_path: Path) -> Path:
    path = save_safetensors(tmp_path / "good.safetensors", good_kohya())
    assert wsa.load_adapter(path).format == "kohya"  # positive control
    return path


# ------------------------------------------------------------------------------------------------
# Broken files


def test_missing_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "empty")


def test_shorter_than_header_length(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    expect_error(path, "truncated")


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_safetensors(kohya_file: Path, keep: float, tmp_path: Path) -> None:
    data = kohya_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(path, "truncated")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    expect_error(path, "header larger than file")


def test_corrupt_header(kohya_file: Path, tmp_path: Path) -> None:
    data = bytearray(kohya_file.read_bytes())
    data[8:12] = b"\xff\xfe{["  # header length intact, JSON broken
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    expect_error(path, "corrupt", "not JSON")


def test_header_valid_json_but_not_safetensors(tmp_path: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)  # 4 bytes for 2 floats
    expect_error(path, "safetensors")


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_tensor(value: float, word: str, tmp_path: Path) -> None:
    tensors = good_kohya()
    tensors[f"{KEY}.lora_up.weight"][3, 1] = value
    path = save_safetensors(tmp_path / "nan.safetensors", tensors)
    expect_error(path, word, f"{KEY}.lora_up.weight")


def test_non_finite_half_tensor_in_peft_folder(tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, generator=g).half(), torch.randn(8, 4, generator=g).half()
    name = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_safetensors(
        tmp_path / "adapter_model.safetensors", {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    )
    assert wsa.load_adapter(tmp_path).format == "peft"  # positive control
    up[0, 0] = float("inf")
    save_safetensors(
        tmp_path / "adapter_model.safetensors", {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    )
    expect_error(tmp_path, "Inf", blame=tmp_path / "adapter_model.safetensors")


def test_not_a_tensor_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    expect_error(path, "not a tensor file")


# ------------------------------------------------------------------------------------------------
# Unknown or inconsistent content


def test_unknown_suffix(tmp_path: Path) -> None:
    tensors = good_kohya() | {"lora_unet_x.weird_suffix": torch.zeros(2)}
    path = save_safetensors(tmp_path / "weird.safetensors", tensors)
    expect_error(path, "unexpected keys", "lora_unet_x.weird_suffix")


def test_unknown_format(tmp_path: Path) -> None:
    path = save_safetensors(tmp_path / "foo.safetensors", {"foo.bar": torch.zeros(3)})
    expect_error(path, "unknown adapter format", "foo")


def test_unknown_kohya_prefix_module(tmp_path: Path) -> None:
    """All keys kohya-prefixed, but one module is only an alpha: incomplete, not silently dropped."""
    tensors = good_kohya() | {"lora_unet_orphan.alpha": torch.tensor(1.0)}
    path = save_safetensors(tmp_path / "orphan.safetensors", tensors)
    expect_error(path, "orphan", "incomplete")


def test_diffusers_key_that_is_not_lora(tmp_path: Path) -> None:
    tensors = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2),
        "unet.down_blocks.0.attentions.0.proj_out.down.weight": torch.zeros(2, 8),
        "unet.down_blocks.0.attentions.0.proj_out.up.weight": torch.zeros(8, 2),
    }
    path = save_safetensors(tmp_path / "pytorch_lora_weights.safetensors", tensors)
    expect_error(path, "not a LoRA tensor")


def test_diffusers_metadata_not_json(tmp_path: Path) -> None:
    tensors = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2),
    }
    good = save_safetensors(tmp_path / "good.safetensors", tensors)
    assert wsa.load_adapter(good).format == "diffusers"
    path = save_safetensors(tmp_path / "bad.safetensors", tensors, metadata={"lora_adapter_metadata": "{not json"})
    expect_error(path, "lora_adapter_metadata", "not JSON")


@pytest.mark.parametrize(
    ("down", "up", "fragment"),
    [
        ((4, 8), (8, 3), "inconsistent factor shapes"),
        ((4, 8, 3, 3), (8, 2, 1, 1), "inconsistent factor shapes"),
    ],
)
def test_mismatched_lora_factors(down, up, fragment: str, tmp_path: Path) -> None:
    tensors = {f"{KEY}.lora_down.weight": torch.ones(*down), f"{KEY}.lora_up.weight": torch.ones(*up)}
    path = save_safetensors(tmp_path / "mismatch.safetensors", tensors)
    expect_error(path, fragment, "attn1.to_q")


def test_mismatched_loha_factors(tmp_path: Path) -> None:
    tensors = {
        f"{KEY}.hada_w1_a": torch.ones(8, 2),
        f"{KEY}.hada_w1_b": torch.ones(2, 8),
        f"{KEY}.hada_w2_a": torch.ones(8, 2),
        f"{KEY}.hada_w2_b": torch.ones(2, 6),  # W2 is 8×6, W1 is 8×8
    }
    path = save_safetensors(tmp_path / "loha.safetensors", tensors)
    expect_error(path, "attn1.to_q")


def test_mixed_loha_and_lokr_parts(tmp_path: Path) -> None:
    tensors = {
        f"{KEY}.hada_w1_a": torch.ones(8, 2),
        f"{KEY}.hada_w1_b": torch.ones(2, 8),
        f"{KEY}.lokr_w2_a": torch.ones(8, 2),
        f"{KEY}.lokr_w2_b": torch.ones(2, 8),
    }
    path = save_safetensors(tmp_path / "mixed.safetensors", tensors)
    expect_error(path, "incomplete or mixed")


def test_alpha_with_several_values(tmp_path: Path) -> None:
    tensors = good_kohya() | {f"{KEY}.alpha": torch.tensor([1.0, 2.0])}
    path = save_safetensors(tmp_path / "alpha.safetensors", tensors)
    expect_error(path, "alpha", "2 values")


def test_same_module_under_two_spellings(tmp_path: Path) -> None:
    """Diffusers and LDM spellings of one module in one file would silently overwrite each other."""
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    tensors = good_kohya() | {k.replace(KEY, ldm): v for k, v in good_kohya().items()}
    path = save_safetensors(tmp_path / "twice.safetensors", tensors)
    expect_error(path, "appears twice")


# ------------------------------------------------------------------------------------------------
# Pickles


class _Evil:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_malicious_pickle_is_refused_without_running(suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"pytorch_lora_weights{suffix}"
    torch.save({f"{KEY}.lora_down.weight": torch.zeros(2, 8), "payload": _Evil(marker)}, path)
    expect_error(path, "refused to load pickle", "weights_only=True")
    assert not marker.exists(), "unpickling ran the payload"


def test_plain_tensor_dict_pickle_is_read(tmp_path: Path) -> None:
    """Positive control for the pickle cases: a dict of tensors in a .pt loads."""
    path = tmp_path / "lora.pt"
    torch.save(good_kohya(), path)
    adapter = wsa.load_adapter(path)
    assert adapter.format == "kohya"
    assert len(adapter.modules) == 1


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ([torch.zeros(8, 4), torch.zeros(4, 8)], "list"),  # cloneofsimo/lora .pt
        ({"a": torch.zeros(2), "b": 3}, "dict"),
    ],
)
def test_pickle_not_a_tensor_dict(payload, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save(payload, path)
    expect_error(path, f"pickle holds {kind}", "not a dict of tensors")


# ------------------------------------------------------------------------------------------------
# PEFT folders


def _peft_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    name = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = good_kohya()
    save_safetensors(
        folder / "adapter_model.safetensors",
        {f"{name}.lora_A.weight": t[f"{KEY}.lora_down.weight"], f"{name}.lora_B.weight": t[f"{KEY}.lora_up.weight"]},
    )
    return folder


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_safetensors(tmp_path / "sub" / "adapter_model.safetensors", good_kohya())
    expect_error(tmp_path, "no adapter_config.json")


def test_peft_config_rank_inconsistent(tmp_path: Path) -> None:
    assert (
        wsa.load_adapter(_peft_folder(tmp_path / "ok", {"peft_type": "LORA", "r": 4, "lora_alpha": 8})).format == "peft"
    )
    folder = _peft_folder(tmp_path, {"peft_type": "LORA", "r": 16, "lora_alpha": 8})
    expect_error(folder, "rank 4", "r=16", blame=folder / "adapter_model.safetensors")


def test_peft_rank_pattern_inconsistent(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 2}})
    expect_error(folder, "r=2", blame=folder / "adapter_model.safetensors")


def test_peft_config_not_json(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, {"r": 4})
    (folder / "adapter_config.json").write_text("{r: 4,")
    expect_error(folder, "not valid JSON", blame=folder / "adapter_config.json")


def test_peft_config_other_tuner(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, {"peft_type": "PROMPT_TUNING"})
    expect_error(folder, "PROMPT_TUNING", blame=folder / "adapter_config.json")


def test_peft_config_without_weights(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, {"peft_type": "LORA", "r": 4})
    (folder / "adapter_model.safetensors").unlink()
    expect_error(folder, "no adapter_model.safetensors")


def test_unknown_module_in_adapter_delta(kohya_file: Path) -> None:
    adapter = wsa.load_adapter(kohya_file)
    with pytest.raises(wsa.FormatError, match="no module 'x'") as info:
        adapter.delta("x")
    assert "\n" not in str(info.value)
    with pytest.raises(wsa.FormatError, match="no module 'x'"):
        adapter.bias_delta("x")
