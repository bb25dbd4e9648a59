"""Embedded worlds (issue 4): families with known attributes, deterministic batched rendering, prompts, CLI.

The worlds are ground truth for everything downstream, so the checks here are about trust: same seed
gives the same tables and pixels, a batch split changes nothing, every attribute and nuisance visibly
changes the image, an identity keeps its look across views, and prompts stay inside the vocabulary.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsa.cli import main
from wsa.errors import ConfigError
from wsa.images import save_grid, tile_images
from wsa.worlds import (
    FAMILIES,
    IDENTITY_TOKEN,
    Family,
    available_families,
    get_family,
    register_family,
    sdf,
)
from wsa.worlds.dogs import coat_colour
from wsa.worlds.faces import skin_colour

NAMES = available_families()


@pytest.fixture(params=NAMES)
def family(request: pytest.FixtureRequest) -> Family:
    return get_family(request.param)


def changed_pixels(a: torch.Tensor, b: torch.Tensor, tol: float = 0.1) -> int:
    """Pixels whose colour differs by more than ``tol`` in some channel (images (3, H, W))."""
    return int(((a - b).abs().amax(dim=0) > tol).sum())


# --------------------------------------------------------------------------------------------------
# Registry and declarations


def test_registry_lists_builtin_families() -> None:
    assert {"faces", "dogs"} <= set(available_families())
    assert isinstance(get_family("faces"), Family)
    with pytest.raises(ConfigError, match=r"did you mean 'faces'"):
        get_family("facs")


def test_register_family_rejects_duplicates_and_non_families() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_family("faces")(type(get_family("faces")))
    with pytest.raises(TypeError):
        register_family("not_a_family")(int)  # type: ignore[arg-type]
    assert "not_a_family" not in FAMILIES


def test_family_declares_enough_attributes_of_every_kind(family: Family) -> None:
    kinds = [a.kind for a in family.attributes]
    assert len(kinds) >= 8
    assert set(kinds) == {"binary", "continuous", "categorical"}
    assert len(family.nuisances) >= 4
    assert any(n.in_prompt for n in family.nuisances)
    names = [a.name for a in family.attributes] + [n.name for n in family.nuisances] + ["id", "prompt"]
    assert len(names) == len(set(names)), "attribute, nuisance and CSV column names must not collide"


# --------------------------------------------------------------------------------------------------
# Sampling


def test_tables_are_deterministic_and_well_typed(family: Family) -> None:
    ids, views = family.sample_identities(50, seed=3), family.sample_nuisance(50, seed=3)
    pd.testing.assert_frame_equal(ids, family.sample_identities(50, seed=3))
    pd.testing.assert_frame_equal(views, family.sample_nuisance(50, seed=3))
    assert not ids.equals(family.sample_identities(50, seed=4))
    assert list(ids.columns) == ["id"] + [a.name for a in family.attributes]
    assert ids["id"].iloc[42] == "id_00042"
    for spec in family.attributes:
        col = ids[spec.name]
        if spec.kind == "binary":
            assert col.dtype == np.int64 and set(col) == {0, 1}
        elif spec.kind == "continuous":
            assert col.between(*spec.values).all() and col.nunique() > 40
        else:
            assert set(col) <= set(spec.values) and col.nunique() > 1
    for spec in family.nuisances:
        col = views[spec.name]
        assert col.between(*spec.values).all() if spec.kind == "continuous" else set(col) <= set(spec.values)


def test_more_rows_extend_the_table(family: Family) -> None:
    """The first m of n identities equal m identities with the same seed: a table can grow."""
    pd.testing.assert_frame_equal(family.sample_identities(30, 1).head(10), family.sample_identities(10, 1))
    pd.testing.assert_frame_equal(family.sample_nuisance(30, 1).head(10), family.sample_nuisance(10, 1))


def test_identity_and_nuisance_streams_are_independent(family: Family) -> None:
    """Same seed for both tables must not tie an attribute to a nuisance (they would share uniforms)."""
    ids, views = family.sample_identities(400, 0), family.sample_nuisance(400, 0)
    first_attr, first_nuis = family.attributes[0], family.nuisances[0]
    a = ids[first_attr.name].to_numpy(dtype=float)
    b = views[first_nuis.name].to_numpy(dtype=float)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.2


# --------------------------------------------------------------------------------------------------
# Rendering


def test_render_shape_dtype_range_and_determinism(family: Family) -> None:
    ids, views = family.sample_identities(12, 0), family.sample_nuisance(12, 0)
    images = family.render(ids, views, size=64)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images, family.render(ids, views, size=64))
    assert family.render(ids, views, size=32).shape == (12, 3, 32, 32)
    # different images for different identities (no constant output)
    assert changed_pixels(images[0], images[1]) > 50


@pytest.mark.parametrize("size", [64, 33])
def test_batch_split_gives_identical_pixels(family: Family, size: int) -> None:
    ids, views = family.sample_identities(20, 7), family.sample_nuisance(20, 7)
    whole = family.render(ids, views, size)
    parts = torch.cat(
        [family.render(ids.iloc[:10], views.iloc[:10], size), family.render(ids.iloc[10:], views.iloc[10:], size)]
    )
    assert torch.equal(whole, parts)
    assert torch.equal(whole[13:14], family.render(ids.iloc[[13]], views.iloc[[13]], size))


def _variants(spec) -> list:
    if spec.kind == "binary":
        return [0, 1]
    if spec.kind == "continuous":
        return list(spec.values)  # the two ends of the range
    return list(spec.values)


def test_every_attribute_changes_the_image(family: Family) -> None:
    """Each attribute, flipped or moved end to end (every pair of classes), visibly changes a 32×32 render."""
    bases = family.sample_identities(6, seed=11)
    for spec in family.attributes:
        values = _variants(spec)
        rows = [dict(base, **{spec.name: v}) for base in bases.to_dict("records") for v in values]
        images = family.render(pd.DataFrame(rows), family.neutral_nuisance(len(rows)), size=32)
        images = images.reshape(len(bases), len(values), 3, 32, 32)
        for b, (i, j) in itertools.product(range(len(bases)), itertools.combinations(range(len(values)), 2)):
            n = changed_pixels(images[b, i], images[b, j])
            assert n >= 3, f"{spec.name}: {values[i]!r} vs {values[j]!r} changes only {n} pixels (identity {b})"


def test_every_nuisance_changes_the_image(family: Family) -> None:
    base = family.sample_identities(1, seed=2)
    for spec in family.nuisances:
        rows = family.neutral_nuisance(len(spec.values))
        rows[spec.name] = list(spec.values)
        images = family.render(pd.concat([base] * len(rows), ignore_index=True), rows, size=32)
        for i, j in itertools.combinations(range(len(rows)), 2):
            assert changed_pixels(images[i], images[j]) >= 3, f"{spec.name}: {spec.values[i]!r} vs {spec.values[j]!r}"


def _signature(family: Family, ids: pd.DataFrame) -> np.ndarray:
    """The colour that identifies an identity at a glance: skin (faces) or coat (dogs)."""
    if family.name == "faces":
        return skin_colour(ids["skin_tone"].to_numpy())
    classes = [list(family.attributes[7].values).index(v) for v in ids["coat_colour"]]
    return coat_colour(np.array(classes), ids["fur_tone"].to_numpy())


def _pixels_of_colour(images: torch.Tensor, colour: np.ndarray, tol: float = 0.01) -> np.ndarray:
    target = torch.as_tensor(colour, dtype=torch.float32).reshape(-1, 3, 1, 1)
    return ((images - target).abs().amax(dim=1) < tol).sum(dim=(1, 2)).numpy()


def test_identity_keeps_its_colour_across_views(family: Family) -> None:
    """Under every position/scale/pose/expression/background (lighting neutral), the identity's skin or coat
    colour covers a large area; another identity's colour (negative control) does not appear."""
    assert family.name in ("faces", "dogs"), "add a signature colour for a new family"
    ids = family.sample_identities(40, seed=5)
    colours = _signature(family, ids)
    a, b = int(np.argmin(colours.sum(1))), int(np.argmax(colours.sum(1)))  # darkest and lightest
    views = family.sample_nuisance(12, seed=9).assign(brightness=1.0, light_direction=0.0)
    for own, other in ((a, b), (b, a)):
        images = family.render(pd.concat([ids.iloc[[own]]] * 12, ignore_index=True), views, size=64)
        assert _pixels_of_colour(images, colours[own]).min() >= 150
        assert _pixels_of_colour(images, colours[other]).max() <= 10


def test_render_rejects_bad_tables() -> None:
    faces = get_family("faces")
    ids, views = faces.sample_identities(3, 0), faces.sample_nuisance(3, 0)
    with pytest.raises(ConfigError, match="3 identity rows but 2 nuisance rows"):
        faces.render(ids, views.head(2))
    with pytest.raises(ConfigError, match=r"'hair_colour' has unknown value\(s\) \['green'\]"):
        faces.render(ids.assign(hair_colour="green"), views)
    with pytest.raises(ConfigError, match="lacks column"):
        faces.render(ids.drop(columns="beard"), views)
    with pytest.raises(ConfigError, match="values must be 0 or 1"):
        faces.render(ids.assign(beard=2), views)
    assert faces.render(ids.head(0), views.head(0)).shape == (0, 3, 64, 64)


# --------------------------------------------------------------------------------------------------
# SDF primitives (the anti-aliasing contract every family relies on)


def test_coverage_is_one_inside_zero_outside_and_half_on_the_edge() -> None:
    x, y = sdf.grid(64)
    d = sdf.circle(x, y, 0.0, 0.0, 0.5)
    a = sdf.coverage(d, sdf.pixel_width(64))
    assert float(a[0, 32, 32]) == 1.0 and float(a[0, 0, 0]) == 0.0
    area = float(a.sum()) * sdf.pixel_width(64) ** 2
    assert area == pytest.approx(np.pi * 0.25, rel=0.01)  # anti-aliased area matches the disc
    box = sdf.box(torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.0]), 0.0, 0.0, 0.5, 0.3)
    assert box.tolist() == pytest.approx([0.0, -0.3])


# --------------------------------------------------------------------------------------------------
# Prompts


def test_prompts_use_only_vocabulary_words(family: Family) -> None:
    vocab = set(family.vocabulary())
    assert IDENTITY_TOKEN in vocab and family.noun in vocab
    views = family.sample_nuisance(60, seed=1)
    for prompt in family.prompts(views) + family.prompts(views, token=IDENTITY_TOKEN):
        assert set(family.tokenize(prompt)) <= vocab
    first = views.iloc[0]
    assert family.prompt(first, token=IDENTITY_TOKEN).startswith(f"a {IDENTITY_TOKEN} {family.noun}, ")
    with pytest.raises(ConfigError, match="'zebra' is not in"):
        family.tokenize(f"a {family.noun}, zebra")


def test_faces_prompt_names_expression_and_background() -> None:
    faces = get_family("faces")
    assert faces.prompt({"expression": "smiling", "background": "blue"}) == "a face, smiling, on blue"


# --------------------------------------------------------------------------------------------------
# Grid and CLI


def test_tile_images_places_tiles_row_major() -> None:
    images = torch.zeros(3, 3, 4, 4)
    images[1] = 1.0
    grid = tile_images(images)
    assert grid.shape == (8, 8, 3) and grid.dtype == np.uint8
    assert grid[0, 4:].min() == 255 and grid[0, :4].max() == 0 and grid[4:, 4:].max() == 0


def test_cli_world_render_writes_png_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["world", "render", "faces", "--n", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.size == (256, 256)
    table = pd.read_csv(tmp_path / "x.csv")
    faces = get_family("faces")
    assert len(table) == 16 and table["id"].iloc[0] == "id_00000"
    pd.testing.assert_frame_equal(table[[a.name for a in faces.attributes]], faces.sample_identities(16, 0).iloc[:, 1:])
    # the table is enough to reproduce the pixels exactly
    again = faces.render(table, table)
    save_grid(again, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()

    result = CliRunner().invoke(main, ["world", "render", "dogs", "--n", "5", "--size", "32", "--out", str(out)])
    assert result.exit_code == 0
    with Image.open(out) as png:
        assert png.size == (96, 64)
    result = CliRunner().invoke(main, ["world", "render", "cats", "--out", str(out)])
    assert result.exit_code == 1 and "unknown concept family 'cats'" in result.stderr
