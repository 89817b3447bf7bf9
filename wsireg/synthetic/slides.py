"""Synthetic slides and registration pairs: lazy dask arrays and files, rendered from
:mod:`wsireg.synthetic.texture` through :mod:`wsireg.synthetic.deformation` maps.

Brightfield slides are stained RGB (:func:`synthetic_slide`); fluorescence slides of the same
tissue are uint16 channels (:func:`synthetic_fluorescence`), each a mix of the texture's
structure maps (nuclei, cytoplasm, stroma, tissue): a ``DAPI`` channel shows the nuclei the
haematoxylin of an H&E shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from wsireg.io.channels import fluorescence
from wsireg.io.tiff import DEFAULT_TIFF_LAYOUT, TiffLayout, write_ome_tiff
from wsireg.synthetic.deformation import PointMap, SmoothDeformation
from wsireg.synthetic.texture import Stain, TissueTexture, get_stain, get_texture

#: What a render task needs to find its texture: ``(seed, extent (H, W), texture_downsample)``.
TextureKey = tuple[int, tuple[int, int], float]

# --------------------------------------------------------------------------------------------
# Lazy slides, pairs, files
# --------------------------------------------------------------------------------------------


def _render_block(
    block_info: dict | None = None,
    *,
    render: Callable[..., np.ndarray],
    texture: TextureKey,
    **params: object,
) -> np.ndarray:
    """One chunk: ``render(texture, y0, x0, h, w, **params)`` at the chunk's position."""
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    return render(get_texture(*texture), y0, x0, y1 - y0, x1 - x0, **params)


def _texture_array(
    render: Callable[..., np.ndarray],
    shape: tuple[int, int],
    texture: TextureKey,
    samples: tuple[int, np.dtype],
    chunk: int,
    **params: object,
) -> da.Array:
    """A lazy ``(H, W, count)`` array of ``dtype`` (``samples``) of level-0 ``shape``, each
    chunk rendered from ``texture`` by :func:`_render_block`."""
    h, w = int(shape[0]), int(shape[1])
    count, dtype = samples
    name = f"synthetic-{render.__name__}-" + tokenize(texture, params, h, w, chunk, count)
    return da.map_blocks(
        _render_block,
        dtype=dtype,
        chunks=(_split(h, chunk), _split(w, chunk), (count,)),
        meta=np.empty((0, 0, 0), dtype),
        name=name,
        render=render,
        texture=texture,
        **params,
    )


def _texture_key(
    shape: tuple[int, int], seed: int, extent: tuple[int, int] | None, texture_downsample: float
) -> TextureKey:
    """The texture of ``seed`` laid out in ``extent`` (default ``shape``)."""
    ext = (int(shape[0]), int(shape[1])) if extent is None else (int(extent[0]), int(extent[1]))
    return (int(seed), ext, float(texture_downsample))


def _stained(
    tex: TissueTexture,
    y0: int,
    x0: int,
    h: int,
    w: int,
    *,
    stain: Stain,
    deformation: PointMap | None,
) -> np.ndarray:
    return tex.render(y0, x0, h, w, stain, deformation)


def synthetic_slide(
    shape: tuple[int, int],
    seed: int = 0,
    stain: str | Stain = "he",
    deformation: PointMap | None = None,
    chunk: int = 1024,
    *,
    extent: tuple[int, int] | None = None,
    texture_downsample: float = 1.0,
) -> da.Array:
    """A lazy synthetic slide: dask array ``(H, W, 3)`` uint8 RGB of level-0 ``shape``.

    Each chunk evaluates the texture of ``seed`` (tissue laid out in ``extent``, default
    ``shape``) at its pixel positions ``x`` -- or at ``deformation(x)`` when given, so the image
    is the texture sampled through a known map. ``deformation`` maps points ``(N, 2)`` to points
    ``(N, 2)`` and must be smooth: it is evaluated on nodes every ``render_step`` pixels
    (attribute, default 8) and interpolated bilinearly. Pixels do not depend on ``chunk``
    (multiples of 512 are fastest).
    """
    key = _texture_key(shape, seed, extent, texture_downsample)
    return _texture_array(
        _stained,
        shape,
        key,
        (3, np.dtype(np.uint8)),
        chunk,
        stain=get_stain(stain),
        deformation=deformation,
    )


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - i) for i in range(0, n, chunk)) or (0,)


def synthetic_pair(  # noqa: PLR0913 - public keyword-only API: one keyword per documented knob
    shape: tuple[int, int],
    seed: int = 0,
    *,
    max_displacement: float | None = None,
    scale: float | None = None,
    rotation: float = 0.0,
    translation: tuple[float, float] = (0.0, 0.0),
    zoom: float = 1.0,
    shear: float = 0.0,
    flip: bool = False,
    source_stain: str | Stain = "he",
    target_stain: str | Stain = "ihc",
    stain_jitter: float = 0.05,
    chunk: int = 1024,
    texture_downsample: float = 1.0,
) -> tuple[da.Array, da.Array, SmoothDeformation]:
    """A registration problem with exact ground truth: ``(source, target, truth)``.

    ``source`` and ``target`` are lazy ``(H, W, 3)`` uint8 slides (see :func:`synthetic_slide`)
    of the same tissue in two (jittered) stains. ``source`` is the texture itself and
    ``target(x)`` is the texture at ``truth(x)``, so ``truth`` -- a :class:`SmoothDeformation`
    mapping target level-0 points to source level-0 points -- is exactly the ``T: target ->
    source`` a registration must recover: ``source(truth(x)) ~ target(x)``. ``max_displacement``
    (default 2% of ``min(H, W)``) and ``scale`` shape the nonrigid part; ``rotation`` (degrees),
    ``translation``, ``zoom``, ``shear`` and ``flip`` the affine (see
    :meth:`SmoothDeformation.random`).
    """
    h, w = int(shape[0]), int(shape[1])
    if max_displacement is None:
        max_displacement = 0.02 * min(h, w)
    truth = SmoothDeformation.random(
        (h, w),
        max_displacement,
        scale,
        rotation=rotation,
        translation=translation,
        zoom=zoom,
        shear=shear,
        flip=flip,
        seed=seed,
    )
    src_stain = get_stain(source_stain).jitter(2 * seed + 1, stain_jitter)
    tgt_stain = get_stain(target_stain).jitter(2 * seed + 2, stain_jitter)
    common = dict(chunk=chunk, extent=(h, w), texture_downsample=texture_downsample)
    source = synthetic_slide((h, w), seed, src_stain, None, **common)
    target = synthetic_slide((h, w), seed, tgt_stain, truth, **common)
    return source, target, truth


def pair_landmarks(
    shape: tuple[int, int],
    seed: int,
    truth: PointMap,
    n: int = 100,
    *,
    texture_downsample: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` landmark pairs of a :func:`synthetic_pair` of the same ``shape`` and ``seed``:
    target points ``(n, 2)`` on tissue (at integer pixel centres) and their exact source points
    ``truth(target)`` ``(n, 2)``, level-0 ``(x, y)``."""
    h, w = int(shape[0]), int(shape[1])
    tex = get_texture(seed, (h, w), texture_downsample)
    rng = np.random.default_rng([int(seed), 0x1A4D])
    found = np.empty((0, 2))
    for _ in range(50):
        cand = np.stack([rng.integers(0, w, 4 * n), rng.integers(0, h, 4 * n)], -1).astype(float)
        src = truth(cand)
        keep = tex.structure_at(src)[:, 3] > 0.8
        found = np.concatenate([found, cand[keep]])
        if len(found) >= n:
            break
    target = found[:n]
    return target, truth(target)


def write_synthetic_slide(  # noqa: PLR0913 - public keyword-only API: synthetic_slide's knobs
    path: str | Path,
    shape: tuple[int, int],
    *,
    seed: int = 0,
    stain: str | Stain = "he",
    deformation: PointMap | None = None,
    mpp: float = 0.5,
    layout: TiffLayout = DEFAULT_TIFF_LAYOUT,
    overwrite: bool = False,
    texture_downsample: float = 1.0,
    extent: tuple[int, int] | None = None,
) -> Path:
    """Write a synthetic slide (see :func:`synthetic_slide`) as a pyramidal tiled OME-TIFF of
    ``mpp`` um per level-0 pixel, laid out as ``layout``, in bounded memory, via
    :func:`wsireg.io.tiff.write_ome_tiff`."""
    image = synthetic_slide(
        shape,
        seed,
        stain,
        deformation,
        chunk=max(1024, layout.tile),
        extent=extent,
        texture_downsample=texture_downsample,
    )
    return write_ome_tiff(image, path, layout=layout, mpp=(mpp, mpp), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Fluorescence
# --------------------------------------------------------------------------------------------
#: Channel name -> weights of the structure maps ``(nuclei, cytoplasm, stroma, tissue)``.
FLUORESCENCE_PANEL: dict[str, tuple[float, float, float, float]] = {
    "DAPI": (1.0, 0.07, 0.045, 0.05),
    "PanCK": (0.0, 1.0, 0.0, 0.02),
    "SMA": (0.0, 0.0, 1.0, 0.02),
    "CD45": (0.35, 0.0, 0.45, 0.02),
    "Ki67": (0.6, 0.2, 0.0, 0.01),
    "Vimentin": (0.0, 0.2, 0.8, 0.03),
}
#: uint16 level of no signal (camera offset) and of a full amount of signal.
FLUORESCENCE_OFFSET, FLUORESCENCE_GAIN = 80, 3000


def panel_weights(names: tuple[str, ...]) -> tuple[tuple[float, float, float, float], ...]:
    """The structure weights of each channel name: :data:`FLUORESCENCE_PANEL`'s, or for a
    name it lacks (``"NAME-k"`` etc.) the weights of the panel entry it starts with, else of
    the panel's entries in turn."""
    panel = list(FLUORESCENCE_PANEL.items())
    weights = []
    for i, name in enumerate(names):
        found = [w for key, w in panel if name.split("-")[0] == key]
        weights.append(found[0] if found else panel[i % len(panel)][1])
    return tuple(weights)


def _fluorescent(
    tex: TissueTexture,
    y0: int,
    x0: int,
    h: int,
    w: int,
    *,
    weights: tuple[tuple[float, float, float, float], ...],
    deformation: PointMap | None,
) -> np.ndarray:
    structure = tex.structure(y0, x0, h, w, deformation)
    mix = np.asarray(weights, dtype=np.float32)  # (C, 4)
    amount = structure[..., :3] @ mix[:, :3].T + mix[:, 3]
    amount *= structure[..., 3:4]
    values = FLUORESCENCE_OFFSET + FLUORESCENCE_GAIN * np.clip(amount, 0.0, 1.0)
    return np.rint(values).astype(np.uint16)


def synthetic_fluorescence(
    shape: tuple[int, int],
    seed: int = 0,
    channels: tuple[str, ...] = ("DAPI", "PanCK", "SMA"),
    deformation: PointMap | None = None,
    chunk: int = 1024,
    *,
    extent: tuple[int, int] | None = None,
    texture_downsample: float = 1.0,
) -> da.Array:
    """A lazy synthetic fluorescence slide: dask array ``(H, W, C)`` uint16 of the tissue of
    :func:`synthetic_slide` with the same ``seed``, ``extent`` and ``texture_downsample``
    (and ``deformation``, as there). Channel ``c`` is ``OFFSET + GAIN * clip(w_c . s, 0, 1)``
    for the structure maps ``s`` and the weights of its name (:func:`panel_weights`)."""
    return _texture_array(
        _fluorescent,
        shape,
        _texture_key(shape, seed, extent, texture_downsample),
        (len(channels), np.dtype(np.uint16)),
        chunk,
        weights=panel_weights(tuple(channels)),
        deformation=deformation,
    )


def write_synthetic_fluorescence(  # noqa: PLR0913 - public keyword-only API: the slide's knobs
    path: str | Path,
    shape: tuple[int, int],
    *,
    seed: int = 0,
    channels: tuple[str, ...] = ("DAPI", "PanCK", "SMA"),
    deformation: PointMap | None = None,
    mpp: float = 0.5,
    tile: int = 512,
    overwrite: bool = False,
    texture_downsample: float = 1.0,
    extent: tuple[int, int] | None = None,
) -> Path:
    """Write :func:`synthetic_fluorescence` as a pyramidal OME-TIFF (zlib tiles of ``tile``
    px, channel names in the OME-XML), in bounded memory."""
    image = synthetic_fluorescence(
        shape,
        seed,
        tuple(channels),
        deformation,
        chunk=max(1024, tile),
        extent=extent,
        texture_downsample=texture_downsample,
    )
    return write_ome_tiff(
        image,
        path,
        layout=TiffLayout(tile=tile, compression="zlib"),
        mpp=(mpp, mpp),
        name=Path(path).name,
        channel_info=fluorescence(len(channels), np.dtype(np.uint16), list(channels)),
        overwrite=overwrite,
    )
