"""Landmark CSVs and GeoJSON mapped through transforms, both ways, via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsireg.engine.transform import Transform
from wsireg.errors import InputError, OutputExistsError
from wsireg.io.annotations import (
    coordinate_decimals,
    densify,
    map_annotations,
    read_geojson,
    read_landmarks,
    write_geojson,
    write_landmarks,
)
from wsireg.io.output import partial_path
from wsireg.synthetic import annotations as made_up
from wsireg.synthetic.annotations import coordinate_arrays, distance_to_polyline

from .test_transform import SOURCE, TARGET, field_transform, rotation


@pytest.fixture()
def saved_transform(tmp_path: Path) -> tuple[Transform, Path]:
    T = field_transform(downsample=16, affine=rotation(30, (2000, 1500), (25, -40)))
    return T, T.save(tmp_path / "transform")


def test_landmark_csv_round_trip(tmp_path: Path, shared_data: Path) -> None:
    real = read_landmarks(shared_data / "anhir-5pc/rat-kidney_/scale-5pc/Rat-Kidney_HE.csv")
    assert real.shape == (71, 2) and tuple(real[0]) == (63.0, 309.0)
    pts = np.array([[1.5, 2.25], [1000.125, 3.0]])
    back = read_landmarks(write_landmarks(tmp_path / "p.csv", pts))
    np.testing.assert_allclose(back, pts)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",X,Y"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="bad.csv"):
        read_landmarks(tmp_path / "bad.csv")


def test_landmark_and_geojson_files_are_staged_and_not_overwritten(tmp_path: Path) -> None:
    csv_path, json_path = tmp_path / "p.csv", tmp_path / "a.geojson"
    write_landmarks(csv_path, np.array([[1.0, 2.0]]))
    write_geojson(json_path, {"type": "Point", "coordinates": [1.0, 2.0]})
    with pytest.raises(OutputExistsError):
        write_landmarks(csv_path, np.array([[3.0, 4.0]]))
    with pytest.raises(OutputExistsError):
        write_geojson(json_path, {"type": "Point", "coordinates": [3.0, 4.0]})
    np.testing.assert_allclose(read_landmarks(csv_path), [[1.0, 2.0]])
    assert read_geojson(json_path)["coordinates"] == [1.0, 2.0]
    write_landmarks(csv_path, np.array([[3.0, 4.0]]), overwrite=True)
    write_geojson(json_path, {"type": "Point", "coordinates": [3.0, 4.0]}, overwrite=True)
    np.testing.assert_allclose(read_landmarks(csv_path), [[3.0, 4.0]])
    assert read_geojson(json_path)["coordinates"] == [3.0, 4.0]
    assert not partial_path(csv_path).exists() and not partial_path(json_path).exists()


def test_warp_points_cli_both_ways(saved_transform, tmp_path: Path, run_cli) -> None:
    T, tdir = saved_transform
    target_pts = np.random.default_rng(5).uniform([100, 100], [3900, 2900], (60, 2))
    source_pts = T.map_points(target_pts, "target_to_source")
    write_landmarks(tmp_path / "source.csv", source_pts)
    # default: source-slide points -> target-slide points (what rTRE evaluates)
    result = run_cli("warp-points", tdir, tmp_path / "source.csv", "-o", tmp_path / "t.csv")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read_landmarks(tmp_path / "t.csv"), target_pts, atol=0.05)
    # --inverse: target-slide points -> source-slide points
    write_landmarks(tmp_path / "target.csv", target_pts)
    result = run_cli(
        "warp-points", tdir, tmp_path / "target.csv", "-o", tmp_path / "s.csv", "--inverse"
    )
    assert result.exit_code == 0
    np.testing.assert_allclose(read_landmarks(tmp_path / "s.csv"), source_pts, atol=1e-3)
    # no overwrite without --overwrite
    result = run_cli("warp-points", tdir, tmp_path / "source.csv", "-o", tmp_path / "t.csv")
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    result = run_cli("warp-points", tdir, tmp_path / "missing.csv", "-o", tmp_path / "m.csv")
    assert result.exit_code == 1 and "missing.csv" in result.stderr
    assert not (tmp_path / "m.csv").exists()


def test_cli_and_api_use_the_same_direction_words(saved_transform, tmp_path: Path, run_cli):
    # a point mapped by `warp-points` is the API's "source_to_target"; `--inverse` its
    # "target_to_source": porting a CLI workflow to Python keeps the direction
    T, tdir = saved_transform
    pts = np.array([[1234.5, 987.25], [2500.0, 1500.0]])
    write_landmarks(tmp_path / "p.csv", pts)
    for flags, direction in (((), "source_to_target"), (("--inverse",), "target_to_source")):
        out = tmp_path / f"{direction}.csv"
        result = run_cli("warp-points", tdir, tmp_path / "p.csv", "-o", out, *flags)
        assert result.exit_code == 0, result.output
        expected = T.map_points(pts, direction)
        np.testing.assert_allclose(read_landmarks(out), expected, atol=1e-3)  # CSV: 3 decimals
    # map_points returns the points only; the residual of T^-1 on request
    mapped, residual = T.map_points_with_residual(pts, "source_to_target")
    np.testing.assert_array_equal(mapped, T.map_points(pts, "source_to_target"))
    assert residual.shape == (2,) and residual.max() < 0.05


def qupath_export() -> list[dict]:
    """What QuPath's 'Export objects as GeoJSON' writes: a list of features."""
    square = [[1000, 1000], [1600, 1000], [1600, 1500], [1000, 1500], [1000, 1000]]
    hole = [[1200, 1200], [1300, 1200], [1300, 1300], [1200, 1300], [1200, 1200]]
    return [
        {
            "type": "Feature",
            "id": "a1",
            "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [square],
                    [[[2000, 2000], [2100, 2000], [2050, 2100], [2000, 2000]]],
                ],
            },
            "properties": {"name": "multi"},
        },
        {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[500, 500], [3000, 700]]},
            "properties": {},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [321.5, 654.5]},
            "properties": {"name": "cell"},
        },
    ]


def test_geojson_round_trip_keeps_structure(saved_transform, tmp_path: Path, run_cli) -> None:
    T, tdir = saved_transform
    src = tmp_path / "ann.geojson"
    src.write_text(json.dumps({"type": "FeatureCollection", "features": qupath_export()}))
    result = run_cli("warp-geojson", tdir, src, "-o", tmp_path / "fwd.geojson")
    assert result.exit_code == 0, result.output
    fwd = json.loads((tmp_path / "fwd.geojson").read_text())
    features = fwd["features"]
    assert features[0]["id"] == "a1"
    assert features[0]["properties"]["classification"]["name"] == "Tumor"
    assert len(features[0]["geometry"]["coordinates"]) == 2  # the hole survives
    assert features[1]["geometry"]["type"] == "MultiPolygon"
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring[0], ring[-1])  # rings stay closed
    assert len(ring) > 5  # long edges were densified (field spacing 16 px)
    line = np.array(features[2]["geometry"]["coordinates"])
    assert len(line) > 2
    # Each mapped vertex is where the inverse transform puts it (QuPath corner convention),
    # rounded to the 2 decimals the default tolerance (0.25 px) justifies.
    point = np.array(features[3]["geometry"]["coordinates"])
    expected = T.map_points(np.array([[321.0, 654.0]]), "source_to_target")
    np.testing.assert_allclose(point, expected[0] + 0.5, atol=0.005 + 1e-9)
    assert point.tolist() == np.round(point, 2).tolist()
    # Mapping back with --inverse returns to the original vertices (up to densification).
    result = run_cli(
        "warp-geojson",
        tdir,
        tmp_path / "fwd.geojson",
        "-o",
        tmp_path / "back.geojson",
        "--inverse",
        "--no-densify",
    )
    assert result.exit_code == 0
    back = json.loads((tmp_path / "back.geojson").read_text())["features"]
    back_ring = np.array(back[0]["geometry"]["coordinates"][0])
    original = np.array(qupath_export()[0]["geometry"]["coordinates"][0], float)
    dense = densify(original, 8.0)
    # every original vertex is among the round-tripped ones
    for vertex in original:
        assert np.min(np.linalg.norm(back_ring - vertex, axis=1)) < 0.05
    assert len(back_ring) >= len(original) and len(dense) > len(original)
    np.testing.assert_allclose(
        back[3]["geometry"]["coordinates"],
        qupath_export()[3]["geometry"]["coordinates"],
        atol=0.05,
    )


def test_map_geojson_of_a_bare_geometry_and_centre_origin() -> None:
    doc = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}
    shifted = map_annotations(doc, lambda p: p + [5, 7], pixel_origin="centre").document
    assert shifted["coordinates"][0][1] == [15.0, 7.0]
    assert doc["coordinates"][0][1] == [10, 0]  # input untouched


def test_bad_geojson(tmp_path: Path, saved_transform, run_cli) -> None:
    _, tdir = saved_transform
    (tmp_path / "bad.geojson").write_text("{nope")
    result = run_cli("warp-geojson", tdir, tmp_path / "bad.geojson", "-o", tmp_path / "o.json")
    assert result.exit_code == 1 and "bad.geojson" in result.stderr
    assert not (tmp_path / "o.json").exists()


def test_identity_transform_keeps_points() -> None:
    pts = np.array([[5.0, 6.0]])
    identity = Transform.identity(TARGET, SOURCE)
    assert identity.map_points(pts, "source_to_target") == pytest.approx(pts)


def polylines(node: object) -> list[np.ndarray]:
    """Every line and ring of a GeoJSON tree, in document order (points left out)."""
    return [array for is_line, array in coordinate_arrays(node) if is_line]


def test_geojson_is_densified_where_the_transform_bends_it(
    saved_transform, tmp_path: Path, run_cli
) -> None:
    T, tdir = saved_transform
    features = made_up.qupath_export()  # cells and every geometry kind
    src, out = tmp_path / "cells.geojson", tmp_path / "cells-target.geojson"
    src.write_text(json.dumps(features))
    result = run_cli("warp-geojson", tdir, src, "-o", out)
    assert result.exit_code == 0, result.output
    # positions off the source slide (3900 x 3200): the rectangle's 3 corners and the point
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "4 of " in warnings[0] and "source slide" in warnings[0]
    assert out.stat().st_size <= 2 * src.stat().st_size  # a mild deformation: few vertices
    mapped = json.loads(out.read_text())
    assert mapped[6]["properties"]["objectType"] == "cell"
    assert mapped[6]["properties"]["nucleusGeometry"]["type"] == "Polygon"
    tolerance, rounding = 0.25, 0.005 * np.sqrt(2)
    for before, after in zip(polylines(features), polylines(mapped), strict=True):
        assert np.array_equal(after[0], after[-1]) or len(before) == 4  # rings stay closed
        assert np.abs(after * 100 - np.round(after * 100)).max() < 1e-6  # 2 decimals
        # the exact image of the edge, sampled every 0.25 px over the slide (QuPath corners)
        steps = np.maximum(np.ceil(np.linalg.norm(np.diff(before, axis=0), axis=1) / 0.25), 1)
        samples = np.concatenate(
            [
                a + (b - a) * np.arange(n)[:, None] / n
                for a, b, n in zip(before[:-1], before[1:], steps.astype(int), strict=True)
            ]
            + [before[-1:]]
        )
        on_slide = (samples >= 0).all(1) & (samples[:, 0] <= 3900) & (samples[:, 1] <= 3200)
        exact = T.map_points(samples[on_slide] - 0.5, "source_to_target") + 0.5
        assert distance_to_polyline(exact, after).max() <= tolerance + rounding
        if on_slide.all():  # and every written vertex lies on that image (to the rounding)
            assert distance_to_polyline(after, exact).max() <= rounding + 0.01
    # a straight edge under an affine-only transform gets no vertex
    affine = Transform.from_affine(rotation(10, (2000, 1500)), TARGET, SOURCE)
    plain = map_annotations(
        features, lambda p: affine.map_points(p, "source_to_target"), tolerance=0.25
    )
    assert plain.vertices == plain.positions


def test_coordinate_decimals_follow_the_tolerance() -> None:
    assert [coordinate_decimals(t) for t in (1.0, 0.25, 0.1, 0.01)] == [1, 2, 2, 3]
    with pytest.raises(ValueError):
        coordinate_decimals(0.0)
