"""`wsireg stack`: serial sections registered neighbour to neighbour and composed into the
reference frame, against registering each section directly to the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsireg.engine.transform import Transform
from wsireg.io.slide import open_slide
from wsireg.run.register import register
from wsireg.run.stack import chain, neighbour, stack
from wsireg.synthetic.deformation import SmoothDeformation
from wsireg.synthetic.slides import write_synthetic_slide
from wsireg.synthetic.texture import get_stain, get_texture

SHAPE = (512, 512)
SEED = 5
TEXTURE_DOWNSAMPLE = 4.0  # glands and stroma at 512 px: structure at every scale
FAST = {"weights": None, "refine": 16, "levels": 2}
REFERENCE = 1


class Composed:
    """``D_k = E o E o ... o E`` (k times): section k's coordinates -> texture coordinates."""

    def __init__(self, step: SmoothDeformation, times: int) -> None:
        self.step, self.times = step, times
        self.render_step = step.render_step

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        for _ in range(self.times):
            points = self.step(points)
        return points


@pytest.fixture(scope="module")
def sections(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four H&E sections, section k = the texture through ``D_k = E^k``: each section is its
    predecessor deformed by the same smooth nonrigid map ``E`` (8 px, 4 degrees), so
    neighbours differ by ``E`` and distant sections by ``E`` composed several times."""
    root = tmp_path_factory.mktemp("sections")
    step = SmoothDeformation.random(SHAPE, 8.0, 64.0, rotation=4.0, seed=21)
    maps = [Composed(step, k) for k in range(4)]
    paths = [
        write_synthetic_slide(
            root / f"section{k}.ome.tif",
            SHAPE,
            seed=SEED,
            stain=get_stain("he").jitter(k + 1, 0.05),
            deformation=maps[k] if k else None,
            texture_downsample=TEXTURE_DOWNSAMPLE,
        )
        for k in range(4)
    ]
    # reference points on tissue, and where they are in the texture
    texture = get_texture(SEED, SHAPE, TEXTURE_DOWNSAMPLE)
    grid = np.stack(np.meshgrid(np.arange(32, 480, 12.0), np.arange(32, 480, 12.0)), -1)
    grid = grid.reshape(-1, 2)
    points = grid[texture.structure_at(maps[REFERENCE](grid))[:, 3] > 0.3]
    return {"root": root, "paths": paths, "maps": maps, "points": points}


def error_px(transform: Transform, sections: dict, index: int) -> np.ndarray:
    """|D_i(T(x)) - D_ref(x)|: where T sends reference points in section i, against the truth
    (texture coordinates, about reference pixels)."""
    points, maps = sections["points"], sections["maps"]
    mapped = transform.map_points(points, "target_to_source")
    return np.linalg.norm(maps[index](mapped) - maps[REFERENCE](points), axis=1)


def test_chain_and_neighbours() -> None:
    assert [neighbour(i, 2) for i in (0, 1, 3, 4)] == [1, 2, 2, 3]
    assert chain(0, 2) == [1, 0] and chain(4, 2) == [3, 4] and chain(2, 2) == []


def test_stack_lands_in_the_reference_frame_better_than_direct(
    sections: dict, tmp_path: Path
) -> None:
    out = tmp_path / "stack"
    result = stack(sections["paths"], out, REFERENCE, **FAST)
    names = ["00-section0", "01-section1", "02-section2", "03-section3"]
    assert result.names == names and result.reference == "01-section1"
    for i, name in enumerate(names):
        assert (out / "transforms" / name / "transform.json").is_file()
        level0 = zarr.open_group(str(out / f"{name}.ome.zarr"), mode="r")["0"]
        assert level0.shape == (3, *SHAPE)
        transform = Transform.load(result.transforms[name])
        assert len(transform.stages) >= abs(i - REFERENCE)  # one stage (or more) per link
    assert (out / "stack.json").is_file()
    assert sorted(p.name for p in (out / "registrations").iterdir()) == [
        "00-section0-to-01-section1",
        "02-section2-to-01-section1",
        "03-section3-to-02-section2",
    ]
    assert not any(p.name.startswith(".") for p in out.rglob("*") if p.parent == out)

    chained = {
        i: error_px(Transform.load(result.transforms[names[i]]), sections, i) for i in (0, 2, 3)
    }
    identity = error_px(Transform.load(result.transforms[names[REFERENCE]]), sections, REFERENCE)
    assert identity.max() < 1e-9
    # section 3 is two links away: chaining beats registering it directly to the reference
    direct = register(
        sections["paths"][3],
        sections["paths"][REFERENCE],
        tmp_path / "direct",
        write_warped=False,
        **FAST,
    )
    direct_error = error_px(direct.transform, sections, 3)
    before = error_px(Transform.identity(direct.transform.target), sections, 3)
    print(
        "mean error px: chained",
        {i: round(float(e.mean()), 2) for i, e in chained.items()},
        "direct 3:",
        round(float(direct_error.mean()), 2),
        "before 3:",
        round(float(before.mean()), 2),
    )
    assert before.mean() > 10
    assert chained[3].mean() < 0.7 * direct_error.mean(), (chained[3].mean(), direct_error.mean())
    assert chained[3].mean() < 2.5 and max(chained[i].mean() for i in (0, 2)) < 1.5

    # the warped sections look like the reference (one interpolation of the composed chain)
    reference = open_slide(sections["paths"][REFERENCE]).level(0).compute().mean(-1)
    for i, name in enumerate(names):
        warped = zarr.open_group(str(out / f"{name}.ome.zarr"), mode="r")["0"][:].mean(0)
        raw = open_slide(sections["paths"][i]).level(0).compute().mean(-1)
        corr = np.corrcoef(warped.ravel(), reference.ravel())[0, 1]
        assert corr > 0.95 and (
            i == REFERENCE or corr > np.corrcoef(raw.ravel(), reference.ravel())[0, 1]
        )


def test_stack_bad_input(sections: dict, slides_dir: Path, tmp_path: Path, run_cli) -> None:
    paths = [str(p) for p in sections["paths"][:2]]
    bad_reference = run_cli("stack", *paths, "-o", tmp_path / "a", "--reference", "2")
    assert bad_reference.exit_code == 2 and not (tmp_path / "a").exists()
    broken = run_cli(
        "stack", paths[0], slides_dir / "broken.svs", "-o", tmp_path / "b", "--reference", "0"
    )
    assert broken.exit_code == 1 and "broken.svs" in broken.stderr
    assert not (tmp_path / "b").exists()
