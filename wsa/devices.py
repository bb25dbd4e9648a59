"""The one place a device name becomes a ``torch.device``: ``auto`` is the GPU when there is one.

Why one place: the PCA, the decoder, the zoo trainer and the oracle all take ``--device``; each used to
spell the rule itself, with different messages and different names accepted.
"""

from __future__ import annotations

import torch

from wsa.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when torch sees one, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as given.

    Asking for CUDA without one, or for another device type, is a one-line :class:`ConfigError`.
    """
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {str(name)[:40]!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {str(name)[:40]!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r} requested but torch sees no CUDA device; use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(name)!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev
