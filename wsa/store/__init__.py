"""The on-disk weight matrix: layout, representations, discovery and ingest."""

from wsa.store.builder import ingest
from wsa.store.layout import Layout, ModuleLayout, Part
from wsa.store.store import Store, open_store

__all__ = ["Layout", "ModuleLayout", "Part", "Store", "ingest", "open_store"]
