"""The training metadata trainers write into a LoRA's header, parsed into a flat, bounded record.

Why parse at all: the header is a bag of strings, some of them megabytes (``ss_tag_frequency``,
``ss_dataset_dirs``), some JSON, some numbers. A store keeps, per row, the fields a researcher filters
and colours by: the kohya/musubi/ai-toolkit ``ss_*`` keys, the SAI model spec (``modelspec.*``), the
trigger words (the most frequent tags of ``ss_tag_frequency``), ``sshs_model_hash`` (sha256 of the
tensor bytes, which survives header edits) and the software that wrote the file. Values stay strings
(numbers where the field is a number), each cut to a bounded length.

Nothing here trusts the header: keys that are not short strings without control characters are left
out, numbers must be finite ASCII numerals, and ``ss_tag_frequency`` is read only when it is a JSON
object of at most :data:`MAX_TAG_JSON` characters (too deep a nesting is the parser's RecursionError,
caught), and only its first two levels are read; otherwise there are no trigger words.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

#: Prefixes of the header keys kept.
KEPT_PREFIXES = ("ss_", "modelspec.", "sshs_")
KEPT_KEYS = ("software", "training_info", "format", "baseModel", "trainedWords", "name", "version")
#: Fields that are numbers when they parse as one.
NUMERIC = {
    "ss_network_dim",
    "ss_network_alpha",
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_seed",
    "ss_num_reg_images",
    "ss_epoch",
    "ss_steps",
    "ss_min_snr_gamma",
    "ss_noise_offset",
}
#: Long fields whose content is summarised (trigger words) rather than kept.
DROPPED = {"ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_datasets", "ss_bucket_frequency"}
MAX_VALUE = 200
N_TRIGGER_WORDS = 8
#: Longest key kept (kohya's are < 40 characters).
MAX_KEY = 100
#: ``ss_tag_frequency`` longer than this (characters) is not parsed (no trigger words).
MAX_TAG_JSON = 32 << 20
_INTEGER = re.compile(r"[+-]?[0-9]{1,40}")


def parse_training_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The kept fields of a header (see the module docstring), plus ``trigger_words`` when tags are there."""
    out: dict[str, Any] = {}
    keys = [k for k in metadata if isinstance(k, str) and len(k) <= MAX_KEY and _printable(k)]
    for key in sorted(keys):
        value = metadata[key]
        if not isinstance(value, str) or not (key.startswith(KEPT_PREFIXES) or key in KEPT_KEYS):
            continue
        if key in DROPPED:
            continue
        if key in NUMERIC:
            number = _number(value)
            if number is not None:
                out[key] = number
                continue
        out[key] = _clip(value)
    words = trigger_words(metadata.get("ss_tag_frequency"))
    if words:
        out["trigger_words"] = ", ".join(words)
    return out


def trigger_words(tag_frequency: str | None, n: int = N_TRIGGER_WORDS) -> list[str]:
    """The ``n`` most frequent tags over all datasets of an ``ss_tag_frequency`` JSON (``{dataset: {tag: count}}``)."""
    if not isinstance(tag_frequency, str) or not tag_frequency.strip() or len(tag_frequency) > MAX_TAG_JSON:
        return []
    try:
        data = json.loads(tag_frequency)  # the C parser bounds its recursion: deep nesting is a RecursionError
    except (ValueError, RecursionError):
        return []
    counts: dict[str, float] = {}
    if isinstance(data, dict):
        for tags in data.values():
            if not isinstance(tags, dict):
                continue
            for tag, count in tags.items():
                c = _number(count) if isinstance(count, (str, int, float)) and not isinstance(count, bool) else None
                if isinstance(tag, str) and tag.strip() and c is not None:
                    counts[tag.strip()] = counts.get(tag.strip(), 0.0) + c
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    return [_clip(t, 60) for t in ranked[:n]]


def _number(value: str | float) -> float | int | None:
    """A finite number from an ASCII numeral (or a JSON number); ``None`` for anything else."""
    if isinstance(value, int):
        return value if abs(value) < 10**40 else None
    text = str(value).strip()
    if len(text) > 64:
        return None
    if _INTEGER.fullmatch(text):
        return int(text)  # exact: seeds above 2^53 stay integers
    if not text.isascii():
        return None
    try:
        x = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(x):
        return None
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _printable(key: str) -> bool:
    return not any(unicodedata.category(c) == "Cc" for c in key)


def _clip(value: str, n: int = MAX_VALUE) -> str:
    value = value.replace("\x00", "")
    return value if len(value) <= n else value[: n - 1] + "…"
