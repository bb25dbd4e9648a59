"""The attribute oracle: a small CNN that reads every identity attribute of a family back from an image.

Why: decoded images (samples of a LoRA, an edited model, an inversion) have no labels; the oracle is
the measuring instrument that turns them into attribute values, so "the beard edit adds a beard for
93 % of identities" is a number, not an impression. It is trained on the family's own renders with
the nuisances varied (so it reads identity, not pose or lighting) and with mild noise and blur (so a
slightly soft diffusion sample reads like a render). Its accuracy on fresh renders is recorded in
``oracle.json``; every measurement made with it should be read against that.

Heads: one logit per binary attribute, one value per continuous attribute (regressed on the range
mapped to [0, 1]), one logit per class of a categorical attribute. Confidence of an image is the
mean, over binary and categorical attributes, of the probability of the predicted value.

On disk (``wsa/worlds/assets/<family>/oracle/``): ``oracle.safetensors`` (fp16) and ``oracle.json``
(family, architecture, training record, held-out accuracy, sha256).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsa.atomic import write_json, write_with
from wsa.errors import ConfigError, StoreError
from wsa.worlds.family import Family
from wsa.worlds.model import sha256_file

WEIGHTS_FILE = "oracle.safetensors"
CONFIG_FILE = "oracle.json"
INPUT_SIZE = 32


@dataclass(frozen=True)
class OracleTrainConfig:
    """Options of :func:`train_oracle`."""

    train_images: int = 100_000  # renders in the training pool (fresh identities and views)
    test_images: int = 5_000  # held-out renders (another seed) for the recorded accuracy
    steps: int = 6_000
    batch_size: int = 256
    lr: float = 2e-3
    width: int = 32
    seed: int = 0
    device: str = "auto"
    progress: bool = True


class OracleNet(nn.Module):
    """Three conv stages (width, 2·width, 4·width) with GroupNorm and SiLU, then a linear read-out."""

    def __init__(self, n_outputs: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for c in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
            channels = c
        self.features = nn.Sequential(*layers)
        side = INPUT_SIZE // 8
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, 256), nn.SiLU(), nn.Linear(256, n_outputs)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images * 2 - 1))


class Oracle:
    """A trained oracle of one family: :meth:`predict`, :meth:`confidence`, :meth:`score`."""

    def __init__(self, family: Family, net: OracleNet, info: dict[str, Any] | None = None) -> None:
        self.family = family
        self.net = net.eval()
        self.info = info or {}
        self.slices: dict[str, slice] = {}
        start = 0
        for spec in family.attributes:
            width = len(spec.values) if spec.kind == "categorical" else 1
            self.slices[spec.name] = slice(start, start + width)
            start += width
        self.n_outputs = start

    @classmethod
    def untrained(cls, family: Family, width: int = 32, seed: int = 0) -> Oracle:
        torch.manual_seed(seed)
        probe = cls(family, OracleNet(1, width))
        return cls(family, OracleNet(probe.n_outputs, width))

    # ------------------------------------------------------------------------------------------
    def outputs(self, images: Tensor, batch: int = 1024) -> Tensor:
        """Raw head outputs for images (B, 3, H, W) in [0, 1] (resized to 32×32 by area averaging)."""
        device = next(self.net.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                x = _resize(images[start : start + batch].float()).to(device)
                out.append(self.net(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.n_outputs)

    def predict(self, images: Tensor) -> pd.DataFrame:
        """One row per image: every attribute's predicted value (0/1, float in range, class name)."""
        raw = self.outputs(images)
        columns: dict[str, Any] = {}
        for spec in self.family.attributes:
            part = raw[:, self.slices[spec.name]]
            if spec.kind == "binary":
                columns[spec.name] = (part[:, 0] > 0).long().numpy()
            elif spec.kind == "continuous":
                low, high = spec.values
                columns[spec.name] = (low + part[:, 0].clamp(0, 1) * (high - low)).numpy().round(4)
            else:
                columns[spec.name] = np.asarray(spec.values, dtype=object)[part.argmax(1).numpy()]
        return pd.DataFrame(columns)

    def probabilities(self, images: Tensor) -> dict[str, np.ndarray]:
        """P(attribute = 1) per binary attribute (B,), class probabilities per categorical one (B, C)."""
        raw = self.outputs(images)
        out = {}
        for spec in self.family.attributes:
            part = raw[:, self.slices[spec.name]]
            if spec.kind == "binary":
                out[spec.name] = torch.sigmoid(part[:, 0]).numpy()
            elif spec.kind == "categorical":
                out[spec.name] = torch.softmax(part, 1).numpy()
        return out

    def confidence(self, images: Tensor) -> np.ndarray:
        """Per image: mean probability of the predicted value over binary and categorical attributes."""
        probs = self.probabilities(images)
        per = [np.maximum(p, 1 - p) if p.ndim == 1 else p.max(1) for p in probs.values()]
        return np.mean(per, axis=0) if per else np.ones(images.shape[0])

    def score(self, images: Tensor, truth: pd.DataFrame) -> dict[str, dict[str, float]]:
        """Agreement of predictions with ``truth`` (one row per image): accuracy, or R² and MAE."""
        return agreement(self.predict(images), truth.reset_index(drop=True), self.family)

    # ------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        write_with(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        record = {
            "kind": "wsa_world_oracle",
            "family": self.family.name,
            "width": self.net.features[0].out_channels,
            "outputs": {k: [s.start, s.stop] for k, s in self.slices.items()},
            **self.info,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(folder / WEIGHTS_FILE)},
        }
        write_json(folder / CONFIG_FILE, record)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Oracle:
        from safetensors.torch import load_file

        from wsa.worlds import get_family

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise StoreError(f"not an oracle folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})", folder)
        record = json.loads(config_path.read_text())
        if record.get("kind") != "wsa_world_oracle":
            raise StoreError(f"kind {record.get('kind')!r} is not wsa_world_oracle", config_path)
        if sha256_file(weights_path) != record["weights"]["sha256"]:
            raise StoreError(
                "sha256 does not match oracle.json; the weights are corrupt or were replaced", weights_path
            )
        family = get_family(record["family"])
        oracle = cls.untrained(family, record["width"])
        oracle.net.load_state_dict({k: v.float() for k, v in load_file(weights_path).items()})
        oracle.net.to(device).eval()
        oracle.info = {k: v for k, v in record.items() if k not in ("weights", "outputs", "kind", "family", "width")}
        return oracle


def builtin_oracle(family: str, device: str | torch.device = "cpu") -> Oracle:
    """The oracle shipped for ``family`` (``wsa/worlds/assets/<family>/oracle``)."""
    from wsa.worlds import ASSETS

    folder = ASSETS / family / "oracle"
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"no shipped oracle for family {family!r}; train one with `wsa world train-oracle`")
    return Oracle.load(folder, device)


def agreement(predicted: pd.DataFrame, truth: pd.DataFrame, family: Family) -> dict[str, dict[str, float]]:
    """Per attribute: ``accuracy`` (binary, categorical) or ``r2`` and ``mae`` (continuous) of predictions."""
    out: dict[str, dict[str, float]] = {}
    for spec in family.attributes:
        p, t = predicted[spec.name].to_numpy(), truth[spec.name].to_numpy()
        if spec.kind == "continuous":
            p, t = p.astype(float), t.astype(float)
            ss = float(((t - t.mean()) ** 2).sum())
            out[spec.name] = {
                "kind": spec.kind,
                "r2": 1 - float(((p - t) ** 2).sum()) / ss if ss > 0 else float("nan"),
                "mae": float(np.abs(p - t).mean()),
                "range": float(spec.values[1] - spec.values[0]),
            }
        elif spec.kind == "binary":  # 0/1 may arrive as ints, floats or bools
            same = np.asarray(p, dtype=float) == np.asarray(t, dtype=float)
            out[spec.name] = {"kind": spec.kind, "accuracy": float(same.mean())}
        else:
            out[spec.name] = {"kind": spec.kind, "accuracy": float((p.astype(str) == t.astype(str)).mean())}
    return out


def _resize(images: Tensor) -> Tensor:
    if images.shape[-1] == INPUT_SIZE and images.shape[-2] == INPUT_SIZE:
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")


def _targets(oracle: Oracle, table: pd.DataFrame) -> dict[str, Tensor]:
    out = {}
    for spec in oracle.family.attributes:
        column = table[spec.name]
        if spec.kind == "binary":
            out[spec.name] = torch.tensor(column.to_numpy(dtype=np.float32))
        elif spec.kind == "continuous":
            low, high = spec.values
            out[spec.name] = torch.tensor(((column.to_numpy(dtype=np.float32)) - low) / (high - low))
        else:
            index = {str(v): i for i, v in enumerate(spec.values)}
            out[spec.name] = torch.tensor([index[str(v)] for v in column], dtype=torch.long)
    return out


def _loss(oracle: Oracle, raw: Tensor, targets: dict[str, Tensor], pick: Tensor) -> Tensor:
    total = raw.new_zeros(())
    for spec in oracle.family.attributes:
        part, target = raw[:, oracle.slices[spec.name]].float(), targets[spec.name][pick]
        if spec.kind == "binary":
            total = total + F.binary_cross_entropy_with_logits(part[:, 0], target)
        elif spec.kind == "continuous":
            total = total + 10.0 * F.mse_loss(part[:, 0], target)
        else:
            total = total + F.cross_entropy(part, target)
    return total


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mild blur and noise (decoded samples are softer and grainier than renders); colours untouched."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, device=x.device, generator=generator) * 0.6
    sigma = torch.rand(b, 1, 1, 1, device=x.device, generator=generator) * 0.04
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    return ((1 - mix) * x + mix * blur + sigma * noise).clamp(0, 1)


def render_pool(family: Family, n: int, seed: int) -> tuple[Tensor, pd.DataFrame]:
    """``n`` renders of fresh identities under random views at 32×32, and their attribute table."""
    identities = family.sample_identities(n, seed=seed)
    views = family.sample_nuisance(n, seed=seed)
    return family.render(identities, views, size=INPUT_SIZE), identities


def train_oracle(family: Family, out: str | Path | None = None, **options: Any) -> Oracle:
    """Train an oracle of ``family`` on fresh renders; record held-out accuracy; save to ``out`` if given."""
    from tqdm.auto import tqdm

    unknown = sorted(set(options) - set(OracleTrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown oracle option(s) {unknown}; known: {sorted(OracleTrainConfig.__dataclass_fields__)}"
        )
    cfg = OracleTrainConfig(**options)
    from wsa.devices import resolve_device

    device = resolve_device(cfg.device)
    started = time.time()
    images, table = render_pool(family, cfg.train_images, seed=1_000 + cfg.seed)
    rendered = time.time() - started
    oracle = Oracle.untrained(family, cfg.width, cfg.seed)
    net = oracle.net.to(device).train()
    images = images.to(device)
    targets = {k: v.to(device) for k, v in _targets(oracle, table).items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc=f"oracle {family.name}", disable=None if cfg.progress else True, file=sys.stderr)
    for step in bar:
        pick = torch.randint(0, images.shape[0], (cfg.batch_size,), device=device, generator=generator)
        loss = _loss(oracle, net(_augment(images[pick], generator)), targets, pick)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    test_images, test_table = render_pool(family, cfg.test_images, seed=2_000 + cfg.seed)
    held_out = oracle.score(test_images, test_table)
    confidence = oracle.confidence(test_images)
    oracle.net = net.cpu().eval()
    oracle.info = {
        "training": {
            "options": asdict(cfg),
            "seconds": round(time.time() - started, 1),
            "render_seconds": round(rendered, 1),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "command": f"wsa world train-oracle {family.name} --out OUT --steps {cfg.steps}",
        },
        "held_out": {"images": cfg.test_images, "per_attribute": held_out, "mean_confidence": float(confidence.mean())},
    }
    if out is not None:
        oracle.save(out)
    return oracle


def parser() -> Any:
    """argparse parser generated from :class:`OracleTrainConfig` (``python -m wsa.worlds.oracle``)."""
    from wsa.worlds.runtime import config_parser

    return config_parser("python -m wsa.worlds.oracle", __doc__.splitlines()[0], OracleTrainConfig)


def main(argv: list[str] | None = None) -> int:
    """``python -m wsa.worlds.oracle --family faces --out DIR [--steps N ...]``."""
    from wsa.worlds import get_family

    args = vars(parser().parse_args(argv))
    family = get_family(args.pop("family"))
    oracle = train_oracle(family, args.pop("out"), **args)
    held = oracle.info["held_out"]["per_attribute"]
    for name, m in held.items():
        value = f"accuracy {m['accuracy']:.3f}" if "accuracy" in m else f"R² {m['r2']:.3f}  MAE {m['mae']:.3f}"
        print(f"{name:14s} {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
