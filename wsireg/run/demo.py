"""``wsireg demo``: a synthetic pair with a known deformation, registered end to end.

The pair (:func:`wsireg.synthetic.slides.synthetic_pair`): an H&E-like source and an IHC-like
target of the same procedural tissue, the target sampled through a known smooth deformation plus a
rotation, so the truth ``T: target -> source`` is exact. Both are written as pyramidal
OME-TIFFs in ``OUT/inputs``; :func:`wsireg.register` runs on them into ``OUT/result``; the
error of the recovered transform at tissue landmarks is printed (level-0 pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsireg.io.output import check_output, remove
from wsireg.run.register import register
from wsireg.synthetic.slides import pair_landmarks, synthetic_pair, write_synthetic_slide

#: Smallest side of the demo's slides (px).
MIN_SIZE = 512


def run_demo(
    out: str | Path, *, size: int = 4096, seed: int = 7, overwrite: bool = False
) -> dict[str, Any]:
    """Write the pair, register it and return the inputs and outputs (absolute paths), the
    landmark errors (level-0 pixels), the similarities of ``report.json`` and the seconds per
    stage."""
    if size < MIN_SIZE:
        raise ValueError(f"the demo's slides need a side of at least {MIN_SIZE} px, not {size}")
    out = Path(out).resolve()
    check_output(out, overwrite)
    remove(out)
    try:
        return _run(out, size, seed)
    except BaseException:
        remove(out)  # nothing complete-looking is left behind
        raise


def _run(out: Path, size: int, seed: int) -> dict[str, Any]:
    """:func:`run_demo` into the (new) folder ``out``."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    shape = (size, size)
    texture = max(1.0, size / 4096)
    max_displacement = 0.008 * size
    _, _, truth = synthetic_pair(
        shape,
        seed,
        max_displacement=max_displacement,
        rotation=12.0,
        texture_downsample=texture,
    )
    source = write_synthetic_slide(
        inputs / "source-he.ome.tif", shape, seed=seed, stain="he", texture_downsample=texture
    )
    target = write_synthetic_slide(
        inputs / "target-ihc.ome.tif",
        shape,
        seed=seed,
        stain="ihc",
        deformation=truth,
        texture_downsample=texture,
    )
    result = register(source, target, out / "result")
    target_pts, source_pts = pair_landmarks(shape, seed, truth, n=300, texture_downsample=texture)
    mapped = result.transform.map_points(target_pts, "target_to_source")
    error = np.linalg.norm(mapped - source_pts, axis=1)
    initial = np.linalg.norm(target_pts - source_pts, axis=1)
    return {
        "inputs": {"source": str(source), "target": str(target)},
        "outputs": {
            "transform": str(result.out / "transform"),
            "warped": str(result.warped),
            "qc": str(result.out / "qc"),
            "report": str(result.out / "report.json"),
        },
        "landmark_error_px": {
            "before_mean": round(float(initial.mean()), 2),
            "after_mean": round(float(error.mean()), 2),
            "after_p90": round(float(np.percentile(error, 90)), 2),
            "after_max": round(float(error.max()), 2),
        },
        "similarity": {
            k: result.report["similarity"][k] for k in ("measure", "before", "affine", "final")
        },
        "seconds": result.report["timings_s"],
    }
