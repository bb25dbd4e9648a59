"""wsa: weight-space analysis of fine-tuned diffusion adapters.

The public surface is small: read one adapter (:func:`load_adapter`), turn a collection into an
on-disk matrix (:func:`ingest`) and open it again (:func:`open_store`).
"""

from __future__ import annotations

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import CollectionError, ConfigError, FormatError, StoreError, WsaError
from wsa.formats import load_adapter
from wsa.store import Store, ingest, open_store

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "CollectionError",
    "ConfigError",
    "FormatError",
    "ModuleWeights",
    "Store",
    "StoreError",
    "WsaError",
    "__version__",
    "ingest",
    "load_adapter",
    "open_store",
]
