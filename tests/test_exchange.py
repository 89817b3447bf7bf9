"""Transforms exported to and imported from other tools: ITK displacement images (read by
SimpleITK) and OME-NGFF 0.6 ``displacements`` fields (validated against the 0.6 schema and read
by ngff-zarr where it is installed); both read back by wsireg and used by the CLI verbs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from wsireg.core.coords import to_level0
from wsireg.engine.exchange import (
    MAX_ITK_NODES,
    ComponentView,
    export_itk,
    export_ngff,
    ngff_displacements,
)
from wsireg.engine.transform import SlideRef, Transform
from wsireg.errors import OutputExistsError, TransformError
from wsireg.io.annotations import read_landmarks, write_landmarks
from wsireg.io.slide import open_slide

from .test_transform import field_transform, rotation

#: Landmark agreement asked of an exported field (level-0 px).
TOLERANCE = 1e-3


@pytest.fixture()
def transform() -> Transform:
    """A rotation by 30 degrees and a smooth field of up to 12 px, at downsample 16."""
    return field_transform(downsample=16, affine=rotation(30, (2000, 1500), (25, -40)))


def grid_nodes(downsample: float) -> np.ndarray:
    """Level-0 positions of a few nodes of the target grid at ``downsample`` (edges too)."""
    width, height = np.ceil(4000 / downsample), np.ceil(3000 / downsample)
    gx = to_level0(np.round(np.array([0, 0.01, 0.1, 0.4, 0.7, 1]) * (width - 1)), downsample)
    gy = to_level0(np.round(np.array([0, 0.02, 0.3, 0.6, 0.8, 1]) * (height - 1)), downsample)
    return np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)


def inside_points(count: int, seed: int = 0) -> np.ndarray:
    """Target points well inside the grid of nodes (between nodes)."""
    return np.random.default_rng(seed).uniform([20, 20], [3970, 2970], (count, 2))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_itk_field_maps_points_like_ours_in_simpleitk(
    transform: Transform, tmp_path: Path, suffix: str
) -> None:
    path = export_itk(transform, tmp_path / f"field{suffix}")
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (250, 188) and image.GetNumberOfComponentsPerPixel() == 2
    assert image.GetSpacing() == (16.0, 16.0) and image.GetOrigin() == (7.5, 7.5)
    itk = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    for points in (grid_nodes(16), inside_points(200)):  # at nodes, and (exactly) between
        theirs = np.array([itk.TransformPoint(tuple(map(float, p))) for p in points])
        ours = transform.map_points(points, "target_to_source")
        np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)
    back = Transform.load(path)  # read back as a wsireg transform
    points = inside_points(300, seed=1)
    np.testing.assert_allclose(
        back.map_points(points, "target_to_source"),
        transform.map_points(points, "target_to_source"),
        atol=TOLERANCE,
        rtol=0,
    )
    if suffix != ".nii.gz":  # NIfTI has no free-text header: only .mha/.nrrd keep the slides
        assert back.target == transform.target and back.source == transform.source


def test_itk_field_of_a_chain_at_a_coarser_downsample(tmp_path: Path, transform: Transform) -> None:
    chain = transform.then(Transform.from_affine(rotation(-5, (1800, 1600)), SOURCE2, SOURCE2))
    path = export_itk(chain, tmp_path / "chain.mha", downsample=32)
    itk = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    )
    nodes = grid_nodes(32)
    theirs = np.array([itk.TransformPoint(tuple(map(float, p))) for p in nodes])
    np.testing.assert_allclose(theirs, chain.map_points(nodes, "target_to_source"), atol=TOLERANCE)


SOURCE2 = SlideRef(path="next.svs", shape=(3300, 3800))


def test_ngff_field_validates_and_maps_points_like_ours(
    transform: Transform, tmp_path: Path
) -> None:
    path = export_ngff(transform, tmp_path / "field.zarr", chunk=64)  # several chunks
    attributes = json.loads((path / "zarr.json").read_text())["attributes"]
    check_rfc5_structure(attributes["ome"], path)
    assert attributes["wsireg"]["units"] == "level-0 pixels"
    back = Transform.load(path)
    assert isinstance(back.stages[0].field, ComponentView)  # on disk, channels y, x -> x, y
    for points in (grid_nodes(16), inside_points(300)):
        np.testing.assert_allclose(
            back.map_points(points, "target_to_source"),
            transform.map_points(points, "target_to_source"),
            atol=TOLERANCE,
            rtol=0,
        )
    # source -> target (solved) agrees where the result lies inside the field's grid
    sources = transform.map_points(inside_points(100, seed=2), "target_to_source")
    np.testing.assert_allclose(
        back.map_points(sources, "source_to_target"),
        transform.map_points(sources, "source_to_target"),
        atol=TOLERANCE,
        rtol=0,
    )


def check_rfc5_structure(ome: dict, path: Path) -> None:
    """The RFC-5 rules an exported field must meet (independent of any library): version 0.6,
    a ``displacements`` transformation naming declared systems of equal dimension and the
    path of a ``(2, H, W)`` array whose first axis has type ``displacement``."""
    import zarr

    assert ome["version"] == "0.6"
    (multiscale,) = ome["multiscales"]
    systems = {s["name"]: s["axes"] for s in multiscale["coordinateSystems"]}
    (entry,) = multiscale["coordinateTransformations"]
    assert entry["type"] == "displacements" and entry["interpolation"] == "linear"
    source, target = systems[entry["output"]["name"]], systems[entry["input"]["name"]]
    assert [a["name"] for a in target] == [a["name"] for a in source] == ["y", "x"]
    assert all(a["type"] == "space" for a in target + source)
    (dataset,) = multiscale["datasets"]
    assert dataset["path"] == entry["path"]
    (to_field,) = dataset["coordinateTransformations"]
    field_axes = systems[to_field["output"]["name"]]
    assert [a["type"] for a in field_axes] == ["displacement", "space", "space"]
    steps = {t["type"]: t for t in to_field["transformations"]}
    assert steps["scale"]["scale"] == [1.0, 16.0, 16.0]
    assert steps["translation"]["translation"] == [0.0, 7.5, 7.5]
    array = zarr.open_array(path / entry["path"], mode="r")
    assert array.shape == (2, 188, 250) and array.metadata.dimension_names == ("c", "y", "x")
    assert ngff_displacements(path) == multiscale


def test_ngff_field_passes_the_ngff_schema_and_ngff_zarr_reads_it(
    transform: Transform, tmp_path: Path
) -> None:
    ngff_zarr = pytest.importorskip("ngff_zarr")
    pytest.importorskip("jsonschema")
    from ngff_zarr.displacement_field_transform import ngff_displacement_field_to_itk_transform

    path = export_ngff(transform, tmp_path / "field.zarr")
    attributes = json.loads((path / "zarr.json").read_text())["attributes"]
    ngff_zarr.validate(attributes, version="0.6", model="image")  # the 0.6 JSON schema
    multiscales = ngff_zarr.from_ngff_zarr(str(path))
    (entry,) = multiscales.metadata.coordinateTransformations
    (itk_wasm,) = ngff_displacement_field_to_itk_transform(entry, multiscales, ["y", "x"])
    # ngff-zarr's ITK form, handed to SimpleITK, maps points like wsireg
    size, origin, spacing = (itk_wasm.fixedParameters[i : i + 2] for i in (0, 2, 4))
    vectors = np.asarray(itk_wasm.parameters).reshape(int(size[1]), int(size[0]), 2)
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    itk = sitk.DisplacementFieldTransform(image)
    points = np.concatenate([grid_nodes(16), inside_points(100)])
    theirs = np.array([itk.TransformPoint(tuple(map(float, p))) for p in points])
    np.testing.assert_allclose(theirs, transform.map_points(points, "target_to_source"), atol=1e-3)


def test_warp_points_with_an_exported_field_gives_the_same_landmarks(
    transform: Transform, tmp_path: Path, run_cli
) -> None:
    tdir = transform.save(tmp_path / "transform")
    for fmt, name in (("itk", "field.mha"), ("ngff", "field.zarr")):
        result = run_cli("transform", "export", tdir, "--format", fmt, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    # source landmarks whose target position lies inside the field's grid
    landmarks = transform.map_points(inside_points(40, seed=3), "target_to_source")
    write_landmarks(tmp_path / "source.csv", landmarks)
    write_landmarks(tmp_path / "target.csv", inside_points(40, seed=4))
    for points, flags in (("source.csv", ()), ("target.csv", ("--inverse",))):
        outputs = {}
        for given in (tdir, tmp_path / "field.mha", tmp_path / "field.zarr"):
            out = tmp_path / f"{given.name}-{points}"
            result = run_cli("warp-points", given, tmp_path / points, "-o", out, *flags)
            assert result.exit_code == 0, result.output
            outputs[given.name] = read_landmarks(out)
        np.testing.assert_allclose(outputs["field.mha"], outputs["transform"], atol=TOLERANCE)
        np.testing.assert_allclose(outputs["field.zarr"], outputs["transform"], atol=TOLERANCE)


def test_export_refuses_what_it_cannot_write(
    transform: Transform, tmp_path: Path, run_cli, monkeypatch
) -> None:
    tdir = transform.save(tmp_path / "transform")
    out = tmp_path / "field.mha"
    assert run_cli("transform", "export", tdir, "-o", out).exit_code == 0  # itk by its ending
    result = run_cli("transform", "export", tdir, "-o", out)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    with pytest.raises(OutputExistsError):
        export_itk(transform, out)
    result = run_cli("transform", "export", tdir, "-o", tmp_path / "field.txt")
    assert result.exit_code == 1 and "--format" in result.stderr
    # a grid above the in-memory limit is refused, naming the downsample that fits
    monkeypatch.setattr("wsireg.engine.exchange.MAX_ITK_NODES", 10_000)
    result = run_cli("transform", "export", tdir, "-o", tmp_path / "big.mha")
    assert result.exit_code == 1 and "--downsample 64" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "big.mha").exists() and MAX_ITK_NODES == 2**26
    result = run_cli("transform", "export", tdir, "-o", tmp_path / "ok.mha", "--downsample", "64")
    assert result.exit_code == 0, result.output


def test_foreign_itk_fields_are_read_or_refused(tmp_path: Path) -> None:
    # a field of another tool: origin 0 (not wsireg's), no metadata: shifted onto our grid
    vectors = np.zeros((20, 30, 2))
    vectors[..., 0] = np.linspace(0, 5, 30)[None, :]  # x-displacement grows along x
    vectors[..., 1] = 2.0
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetSpacing((4.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "elastix.nii"))
    loaded = Transform.load(tmp_path / "elastix.nii")
    assert not loaded.source.known and loaded.target.shape == (78, 118)  # the grid's extent
    nodes = np.array([[0.0, 0.0], [4.0 * 29, 8.0], [4.0 * 10, 4.0 * 7]])
    itk = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    theirs = np.array([itk.TransformPoint(tuple(p)) for p in nodes])
    np.testing.assert_allclose(loaded.map_points(nodes, "target_to_source"), theirs, atol=1e-9)
    image.SetSpacing((4.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "anisotropic.mha"))
    with pytest.raises(TransformError, match="anisotropic.mha.*spacing"):
        Transform.load(tmp_path / "anisotropic.mha")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "scalar.nrrd"))
    with pytest.raises(TransformError, match="scalar.nrrd.*not a 2-D displacement field"):
        Transform.load(tmp_path / "scalar.nrrd")
    (tmp_path / "junk.mha").write_text("not an image")
    with pytest.raises(TransformError, match="junk.mha"):
        Transform.load(tmp_path / "junk.mha")


def test_warp_with_an_itk_field_of_unknown_source(tmp_path: Path, run_cli) -> None:
    # a translation by (+3, -2) px as a foreign ITK field: the source slide is any slide
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "source.png")
    vectors = np.zeros((12, 16, 2))
    vectors[..., 0], vectors[..., 1] = 3.0, -2.0
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetSpacing((4.0, 4.0))
    image.SetOrigin((1.5, 1.5))  # wsireg's grid at downsample 4
    sitk.WriteImage(image, str(tmp_path / "shift.mha"))
    out = tmp_path / "warped.ome.zarr"
    result = run_cli("warp", tmp_path / "shift.mha", tmp_path / "source.png", "-o", out)
    assert result.exit_code == 0, result.output
    warped = open_slide(out).level(0)[:].compute()
    assert warped.shape == (48, 64, 3)
    np.testing.assert_array_equal(warped[2:40, 0:50], pixels[0:38, 3:53])
