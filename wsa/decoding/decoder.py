"""Weight vectors → images: the one component every gallery, edit, sample and check goes through.

A :class:`Decoder` holds a base model and the store's layout. :meth:`Decoder.images` takes a batch of
weight vectors (rows in the store's representation: a collection member, a PCA sample, an edit, an
interpolation point), a prompt and a seed per image, and which vector each image uses; all adapters of
the batch ride on one copy of the base model (:class:`~wsa.decoding.BatchedLoRA`), so a 4×4 grid of
16 different models is one batched sampling pass. Deterministic per seed (each image's starting noise
comes from its own CPU generator), CUDA when present.

Bases: the embedded world's models (``builtin:faces``, or a folder with ``model.json``). Which base a
collection was trained on is read from the zoo (``zoo.json``) or the adapters' ``adapter_config.json``
(``base_model_name_or_path``) unless given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsa.decoding.batched_lora import BatchedLoRA, Stack
from wsa.decoding.schemes import scheme_for
from wsa.decoding.stacks import stacks_from_adapters
from wsa.devices import resolve_device
from wsa.errors import ConfigError
from wsa.store.layout import Layout
from wsa.store.representations import decode


@dataclass
class Decoder:
    """Decode weight vectors of one layout on one base model.

    Attributes
    ----------
    model : the base (a :class:`wsa.worlds.model.BaseModel`).
    layout : the store's layout (how a row maps to modules and factors).
    base_ref : where the base came from (``builtin:faces`` or a folder), echoed into outputs.
    prompt : the default prompt (the collection's identity prompt, e.g. ``"a sks face, neutral, on blue"``).
    family : the concept family name when the base belongs to an embedded world (enables the oracle).
    device, steps, guidance, batch_size, dtype : sampling settings (fp16 on CUDA unless ``dtype`` says).
    """

    model: Any
    layout: Layout
    base_ref: str
    prompt: str
    family: str | None = None
    device: str = "cpu"
    steps: int = 25
    guidance: float = 3.0
    batch_size: int = 64
    dtype: torch.dtype | None = None  # None: float16 on CUDA, float32 on the CPU

    def images(
        self,
        points: np.ndarray | Mapping[str, Stack],
        assignment: Sequence[int],
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
        inject_after: int = 0,
        assignment_before: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]: image ``b`` from model ``assignment[b]`` (``-1``: the base alone).

        ``points``: rows of the layout (one model each), or the models' per-layer stacks as a space's points
        give them (:meth:`wsa.points.Points.stacks`: a ΔW-space point is stacked factors, never a row).
        ``inject_after`` / ``assignment_before``: w2w's delayed injection (see ``BaseModel.sample``).
        """
        if isinstance(points, Mapping):
            stacks = dict(points)
        else:
            rows = np.atleast_2d(np.asarray(points, dtype=np.float32))
            if rows.shape[1] != self.layout.n_features:
                raise ConfigError(f"rows have {rows.shape[1]} features; the layout has {self.layout.n_features}")
            stacks = stacks_from_adapters([decode(row, self.layout) for row in rows])
        if len(assignment) != len(seeds):
            raise ConfigError(f"{len(assignment)} assignments but {len(seeds)} seeds")
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(seeds)
        layers = self.model.adapter_layers() if hasattr(self.model, "adapter_layers") else self.model.unet
        lora = BatchedLoRA(layers, stacks).to(self.device)
        out = []
        for s in range(0, len(seeds), self.batch_size):
            part = slice(s, s + self.batch_size)
            out.append(
                self.model.sample(
                    prompts[part],
                    list(seeds[part]),
                    steps=self.steps,
                    guidance=self.guidance,
                    device=self.device,
                    dtype=self.dtype or (torch.float16 if str(self.device).startswith("cuda") else torch.float32),
                    lora=lora,
                    assignment=list(assignment[part]),
                    inject_after=inject_after,
                    assignment_before=None if assignment_before is None else list(assignment_before[part]),
                )
            )
        return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)

    def grid(
        self,
        points: np.ndarray | Mapping[str, Stack],
        n: int,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Each of the ``n`` models under every seed, ordered model-major: (model i, seed j) → i·len(seeds) + j."""
        s = len(seeds)
        assignment = np.repeat(np.arange(n), s).tolist()
        seed_list = [int(x) for x in np.tile(np.asarray(seeds), n)]
        prompt_list = None if prompts is None else [p for _ in range(n) for p in prompts]
        return self.images(points, assignment, seed_list, prompt_list)

    def oracle(self) -> Any:
        """The family's attribute oracle (from the base's scheme), or ``None`` when its scheme has none."""
        scheme = scheme_for(self.base_ref)
        if self.family is None or scheme is None:
            return None
        try:
            return scheme.oracle(self.family)
        except ConfigError:
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base_ref,
            "prompt": self.prompt,
            "steps": self.steps,
            "guidance": self.guidance,
            "device": self.device,
        }


def resolve_base(reference: str | Path, config: str | Path | None = None) -> tuple[Any, str]:
    """A base model; returns (model, reference).

    Each registered :class:`~wsa.decoding.schemes.BaseScheme` is asked in turn: the embedded world's
    (``builtin:<family>``, or a folder holding ``model.json``) and Stable Diffusion's (a diffusers folder
    with ``model_index.json``, or a single ``.safetensors``/``.ckpt`` checkpoint with ``config``, a diffusers
    folder of the same model type: a user's own SD 1.x/2.x/XL base).
    """
    text = str(reference)
    scheme = scheme_for(text)
    if scheme is None:
        raise ConfigError(
            f"cannot decode on base {text!r}: give builtin:<family> (builtin:faces, builtin:dogs), a folder with "
            "model.json (from `wsa world train-base`), a diffusers Stable Diffusion folder, or a .safetensors "
            "checkpoint (with its config folder)"
        )
    return scheme.load(text, config), text


def _source_candidates(store: Any) -> list[Path]:
    """Where a store's provenance may be written: ``zoo.json`` of its inputs, the first adapter's configs."""
    paths = [Path(entry) / "zoo.json" for entry in store.manifest.get("inputs", []) or []]
    rows = store.rows
    if rows:
        source = Path(rows[0].get("source", ""))
        paths += [source.parent / "zoo.json", source / "adapter_config.json", source / "unet" / "adapter_config.json"]
    return paths


def _records(store: Any) -> list[tuple[Path, dict]]:
    out = []
    for path in _source_candidates(store):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            out.append((path, record))
    return out


def find_base(store: Any) -> str | None:
    """The base a store's adapters were trained on, from ``zoo.json`` or ``adapter_config.json``; else None."""
    for path, record in _records(store):
        if path.name == "zoo.json" and isinstance(record.get("base"), dict):
            return str(record["base"].get("path"))
        ref = record.get("base_model_name_or_path")
        if isinstance(ref, str) and (ref.startswith("builtin:") or (Path(ref) / "model.json").is_file()):
            return ref
    return None


def zoo_prompt(store: Any) -> str | None:
    """The identity prompt a zoo was trained with (``zoo.json``), or None."""
    for path, record in _records(store):
        if path.name == "zoo.json" and isinstance(record.get("prompt"), str):
            return record["prompt"]
    return None


def make_decoder(
    model: Any, reference: str, layout: Any, prompt: str | None, device: str = "auto", steps: int = 25
) -> Decoder:
    """A :class:`Decoder` on a resolved base: family (world bases), default guidance and prompt checked."""
    family = getattr(model, "family", None)
    family = family if isinstance(family, str) else None
    scheme = scheme_for(reference)
    if prompt is None and family is not None and scheme is not None:
        prompt = scheme.prompt(family)
    device = str(resolve_device(device))
    prompt = prompt or ""
    model.tokenizer([prompt])  # unknown words fail here, not mid-analysis
    return Decoder(
        model=model,
        layout=layout,
        base_ref=reference,
        prompt=prompt,
        family=family,
        device=device,
        steps=steps,
        guidance=getattr(model, "default_guidance", 3.0),
    )


def decoder_for_store(
    store: Any,
    base: str | None = None,
    device: str = "auto",
    prompt: str | None = None,
    steps: int = 25,
) -> Decoder:
    """A :class:`Decoder` for ``store``: base from ``base`` or :func:`find_base`, prompt from the zoo."""
    reference = base or find_base(store)
    if reference is None:
        raise ConfigError(
            "cannot tell which base model these adapters were trained on (no zoo.json, no "
            "base_model_name_or_path naming one); pass --base builtin:<family> or a base folder"
        )
    model, ref = resolve_base(reference)
    return make_decoder(model, ref, store.layout, prompt or zoo_prompt(store), device, steps)
