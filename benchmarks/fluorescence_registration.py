"""Registration across brightfield and fluorescence, and a cyclic-immunofluorescence merge.

Data (:mod:`wsireg.synthetic.slides`, written as pyramidal OME-TIFFs in a temporary folder):

* **H&E -> fluorescence**, per seed: the demo's pair (:mod:`wsireg.run.demo`: ``SIZE`` px, a
  12 degree rotation and a smooth deformation of up to 0.8 % of the size, the same truth),
  once with the demo's IHC target (``brightfield``) and once with a uint16 fluorescence target
  of the same tissue and truth (channels ``PanCK, DAPI, SMA``, :func:`synthetic_fluorescence`:
  ``DAPI`` is the nuclear map a haematoxylin shows). Both registered by
  :func:`wsireg.register` with the defaults: the fluorescence pair on the target's DAPI and
  the source's haematoxylin (:func:`wsireg.run.register.registration_channels`).
  Error: distance of the recovered ``T(target landmark)`` from the true source point, 300
  tissue landmarks (level-0 px).
* **Cyclic IF, 3 rounds** of one tissue, 3 uint16 channels each (``DAPI`` in every round):
  round 1 the reference; rounds 2 and 3 the tissue through their own known deformation
  (rotation 4 / -6 degrees, smooth, up to 0.8 % of the size). Each registered onto round 1 on
  DAPI (``--channel DAPI``), every channel warped; then :func:`wsireg.merge` writes the
  reference and both warped rounds as one 9-channel OME-Zarr. Error as above (round-k points
  ``p`` and their reference position ``D_k(p)``).

Prints one JSON line per registration and per merge, and a summary line: the mean over seeds
of the mean landmark error, brightfield against fluorescence.

``--shown-od`` sets the optical density a full channel amount is shown with (the default's
choice, :data:`wsireg.core.shown.SHOWN_OD`, against others).

    python benchmarks/fluorescence_registration.py [--size 4096] [--seeds 7 8 9] [--shown-od OD]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsireg.core import shown
from wsireg.io.merge import merge
from wsireg.io.slide import open_slide
from wsireg.progress import set_quiet
from wsireg.run.register import register
from wsireg.synthetic.slides import (
    pair_landmarks,
    synthetic_pair,
    write_synthetic_fluorescence,
    write_synthetic_slide,
)

LANDMARKS = 300
ROUND_CHANNELS = (
    ("DAPI", "CD45", "PanCK"),
    ("DAPI", "SMA", "Ki67"),
    ("DAPI", "Vimentin", "CD45-2"),
)
ROUND_ROTATIONS = (4.0, -6.0)


def errors(mapped: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    distance = np.linalg.norm(mapped - truth, axis=1)
    return {
        "mean_px": round(float(distance.mean()), 3),
        "p90_px": round(float(np.percentile(distance, 90)), 3),
        "max_px": round(float(distance.max()), 3),
    }


def he_to_fluorescence(folder: Path, size: int, seed: int) -> dict[str, dict]:
    """The demo's H&E source against its IHC target and against a fluorescence target."""
    shape = (size, size)
    texture = max(1.0, size / 4096)
    _, _, truth = synthetic_pair(
        shape, seed, max_displacement=0.008 * size, rotation=12.0, texture_downsample=texture
    )
    source = write_synthetic_slide(
        folder / f"he-{seed}.ome.tif", shape, seed=seed, stain="he", texture_downsample=texture
    )
    targets = {
        "brightfield": write_synthetic_slide(
            folder / f"ihc-{seed}.ome.tif",
            shape,
            seed=seed,
            stain="ihc",
            deformation=truth,
            texture_downsample=texture,
        ),
        "fluorescence": write_synthetic_fluorescence(
            folder / f"if-{seed}.ome.tif",
            shape,
            seed=seed,
            channels=("PanCK", "DAPI", "SMA"),
            deformation=truth,
            texture_downsample=texture,
        ),
    }
    target_pts, source_pts = pair_landmarks(
        shape, seed, truth, n=LANDMARKS, texture_downsample=texture
    )
    rows = {}
    for kind, target in targets.items():
        start = time.perf_counter()
        result = register(source, target, folder / f"out-{kind}-{seed}")
        mapped = result.transform.map_points(target_pts, "target_to_source")
        rows[kind] = {
            "pair": f"H&E -> {kind}",
            "seed": seed,
            "size": size,
            "registered_on": [
                result.report["source"]["registered_on"],
                result.report["target"]["registered_on"],
            ],
            **errors(mapped, source_pts),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(rows[kind]), flush=True)
    return rows


def cyclic_rounds(folder: Path, size: int, seed: int) -> None:
    """Three rounds registered onto the first on DAPI, then merged."""
    shape = (size, size)
    reference = write_synthetic_fluorescence(
        folder / "round1.ome.tif", shape, seed=seed, channels=ROUND_CHANNELS[0]
    )
    warped = []
    for k, (channels, rotation) in enumerate(
        zip(ROUND_CHANNELS[1:], ROUND_ROTATIONS, strict=True), start=2
    ):
        _, _, deformation = synthetic_pair(
            shape, seed + 100 * k, max_displacement=0.008 * size, rotation=rotation
        )
        path = write_synthetic_fluorescence(
            folder / f"round{k}.ome.tif",
            shape,
            seed=seed,
            channels=channels,
            deformation=deformation,
            extent=shape,
        )
        # landmarks: round-k points p (tissue at D_k(p)) and their reference position D_k(p)
        round_pts, reference_pts = pair_landmarks(shape, seed, deformation, n=LANDMARKS)
        start = time.perf_counter()
        result = register(
            path, reference, folder / f"round{k}-out", source_channel="DAPI", target_channel="DAPI"
        )
        mapped = result.transform.map_points(reference_pts, "target_to_source")
        print(
            json.dumps(
                {
                    "pair": f"round {k} -> round 1 (DAPI)",
                    "seed": seed,
                    "size": size,
                    **errors(mapped, round_pts),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )
        warped.append(result.warped)
    start = time.perf_counter()
    out = merge([reference, *warped], folder / "merged.ome.zarr")
    group = zarr.open_group(str(out), mode="r")
    with open_slide(out) as merged:
        print(
            json.dumps(
                {
                    "merge": str(out.name),
                    "shape": list(group["0"].shape),
                    "dtype": str(group["0"].dtype),
                    "channels": list(merged.channels.names),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--no-rounds", action="store_true", help="Skip the cyclic IF merge.")
    parser.add_argument(
        "--shown-od",
        type=float,
        default=shown.SHOWN_OD,
        help="Optical density of a full shown amount (wsireg.core.shown.SHOWN_OD), to compare.",
    )
    args = parser.parse_args()
    shown.SHOWN_OD = args.shown_od
    set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="wsireg-fluorescence-") as tmp:
        folder = Path(tmp)
        rows = [he_to_fluorescence(folder, args.size, seed) for seed in args.seeds]
        summary = {
            kind: round(float(np.mean([r[kind]["mean_px"] for r in rows])), 3)
            for kind in ("brightfield", "fluorescence")
        }
        print(json.dumps({"summary": "mean landmark error over seeds (px)", **summary}))
        if not args.no_rounds:
            cyclic_rounds(folder, args.size, args.seeds[0])


if __name__ == "__main__":
    main()
