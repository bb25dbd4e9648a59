"""Generated hostile files: every read ends in an adapter or a one-line FormatError, in bounded time.

A few hundred examples here (seconds); ``benchmarks/fuzz_readers.py`` runs the same strategies for
10,000+ and writes the counts to ``docs/measurements/fuzz-readers.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from safetensors.torch import save

from tests.hostile import kohya_tensors, outcome, peft_configs, safetensors_files, write_peft

#: Seconds one read may take (real reads of these files take milliseconds).
TIME_BOUND = 5.0
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _check(path: Path, blame: Path | None = None) -> None:
    result, seconds, message = outcome(path)
    assert result in ("ok", "FormatError"), message
    assert seconds < TIME_BOUND, (seconds, message)
    if result == "FormatError":
        assert "\n" not in message, message
        assert message.startswith(str(blame or path)), message


@FUZZ
@given(blob=safetensors_files())
def test_fuzzed_safetensors_headers(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(blob)
        _check(path)


@FUZZ
@given(config=peft_configs())
def test_fuzzed_peft_configs(config: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_peft(Path(tmp) / "adapter", config)
        result, seconds, message = outcome(folder)
        assert result in ("ok", "FormatError"), message
        assert seconds < TIME_BOUND, (seconds, message)
        assert "\n" not in message, message
        assert not message or message.startswith(str(folder)), message


@FUZZ
@given(tensors=kohya_tensors())
def test_fuzzed_kohya_factors(tensors) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.safetensors"
        path.write_bytes(save(tensors))
        _check(path)
