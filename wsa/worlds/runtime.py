"""What every embedded-world job (train-base, train-oracle, zoo, inversion) shares: device choice, the
hardware record, the training noise schedule, and command-line flags generated from a config dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from typing import Any

import torch


def hardware(device: torch.device) -> dict[str, Any]:
    """The record of where a job ran, kept in the output's JSON."""
    info = {"device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def config_parser(prog: str, description: str, config_cls: type, extra: dict[str, dict] | None = None):
    """``--family``, ``--out``, the ``extra`` flags, then one flag per field of ``config_cls`` (its defaults)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--family", required=True)
    parser.add_argument("--out", required=True)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    for f in dataclasses.fields(config_cls):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default!r}")
    return parser
