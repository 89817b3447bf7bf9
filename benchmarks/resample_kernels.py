"""Resampling kernels for the warp engine's block function, timed on one output chunk.

A 1024 x 1024 RGB uint8 chunk is resampled from a 1200 x 1200 source box through a smooth
random coordinate map (what :func:`wsireg.engine.warp.warp_block` does per chunk), with each
candidate: OpenCV ``remap`` (bilinear, 1/32-px fixed-point weights, uint8 in and out: what
wsireg uses), ``remap`` on float32 maps split into two int16 + weight maps first
(``convertMaps``), torch ``grid_sample`` (bilinear, float32, the naive choice), and scipy
``map_coordinates`` (order 1). Prints one JSON line per kernel: median milliseconds per chunk,
megapixels per second (one thread each), and the largest difference from the float reference
in grey levels.

    python benchmarks/resample_kernels.py
"""

from __future__ import annotations

import json
import statistics
import time

import cv2
import numpy as np
import torch

SIDE, BOX = 1024, 1200


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (BOX, BOX, 3), dtype=np.uint8)
    source = cv2.GaussianBlur(source, (0, 0), 2.0)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    map_x = xs + 60 + 20 * np.sin(ys / 200) + 0.01 * ys
    map_y = ys + 60 + 20 * np.cos(xs / 170) - 0.01 * xs
    return source, map_x.astype(np.float32), map_y.astype(np.float32)


def kernels(source: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> dict:
    def remap() -> np.ndarray:
        return cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderValue=(255, 255, 255))

    def remap_fixed() -> np.ndarray:
        m1, m2 = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
        return cv2.remap(source, m1, m2, cv2.INTER_LINEAR, borderValue=(255, 255, 255))

    src_t = torch.from_numpy(source).permute(2, 0, 1)[None]
    h, w = source.shape[:2]

    def grid_sample() -> np.ndarray:
        grid = torch.stack(
            (
                torch.from_numpy(map_x) * (2.0 / (w - 1)) - 1.0,
                torch.from_numpy(map_y) * (2.0 / (h - 1)) - 1.0,
            ),
            -1,
        )[None]
        out = torch.nn.functional.grid_sample(
            src_t.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return out[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    candidates = {"cv2.remap (wsireg)": remap, "cv2.remap + convertMaps": remap_fixed}
    candidates["torch.grid_sample"] = grid_sample
    try:
        from scipy.ndimage import map_coordinates

        def scipy_order1() -> np.ndarray:
            return np.stack(
                [
                    map_coordinates(source[..., c], [map_y, map_x], order=1, mode="nearest")
                    for c in range(3)
                ],
                -1,
            )

        candidates["scipy map_coordinates"] = scipy_order1
    except ImportError:
        pass
    return candidates


def main() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    source, map_x, map_y = inputs()
    reference = kernels(source, map_x, map_y)["torch.grid_sample"]().astype(np.int16)
    for name, fn in kernels(source, map_x, map_y).items():
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        print(
            json.dumps(
                {
                    "benchmark": "resample_kernels",
                    "kernel": name,
                    "ms_per_chunk": round(ms, 2),
                    "mpx_per_s": round(SIDE * SIDE / ms / 1000, 1),
                    "max_diff_grey": int(np.abs(out.astype(np.int16) - reference).max()),
                }
            )
        )


if __name__ == "__main__":
    main()
