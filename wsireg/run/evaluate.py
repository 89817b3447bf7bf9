"""ANHIR metrics of registration results, from landmarks: :func:`evaluate` and its building blocks.

Pair tables
    The ANHIR pair-table format: a CSV with the columns ``Source image`` and ``Target image``,
    optionally ``Source landmarks`` and ``Target landmarks`` (ANHIR landmark CSVs, see
    :mod:`wsireg.io.annotations`), paths relative to the CSV; any other column is kept as metadata.
    :func:`read_pairs` reads it into :class:`Pair` s, each with a stable, readable and unique
    folder name (``<row>-<source>-to-<target>``, the row index zero-padded), under which
    :func:`wsireg.run.batch.batch` writes the pair's ``register`` output.

Metrics (ANHIR, Borovec et al. 2020)
    Point i of the source landmarks corresponds to point i of the target landmarks; where the
    counts differ the first ``min(n_source, n_target)`` are used. The source landmarks are
    mapped into the target by the transform (``map_points(points, "source_to_target")``), and
    ``rTRE = |mapped - target landmark| / diagonal of the target image`` (level-0
    pixels). TRE in micrometres uses the target's mpp where known. *Robustness* is the share of
    landmarks whose distance to their target landmark decreased compared with no registration
    (the source landmark taken as it is). Summaries over pairs: median and mean of the per-pair
    median rTRE, and of the robustness. The rTRE of the affine stage alone comes from the
    transform's first stage (:attr:`wsireg.engine.transform.Transform.initial_affine`).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsireg.engine.transform import Transform
from wsireg.errors import InputError, WsiregError
from wsireg.io.annotations import read_landmarks
from wsireg.io.output import staged_output
from wsireg.io.slide import open_slide

SOURCE_IMAGE = "Source image"
TARGET_IMAGE = "Target image"
SOURCE_LANDMARKS = "Source landmarks"
TARGET_LANDMARKS = "Target landmarks"
KNOWN_COLUMNS = (SOURCE_IMAGE, TARGET_IMAGE, SOURCE_LANDMARKS, TARGET_LANDMARKS)
#: Longest part of a pair folder name taken from one image name.
NAME_PART = 40
#: Per-pair metrics (the columns of tables and summaries), in order.
METRICS = (
    "n_landmarks",
    "median_rtre",
    "mean_rtre",
    "max_rtre",
    "median_rtre_before",
    "affine_median_rtre",
    "robustness",
    "median_tre_um",
    "mean_tre_um",
    "max_tre_um",
    "inverse_residual_px_max",
)


# --------------------------------------------------------------------------------------------
# Pair tables
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One row of a pair table: absolute paths, its folder name and the other columns."""

    index: int
    name: str
    source: str
    target: str
    source_landmarks: str | None = None
    target_landmarks: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def has_landmarks(self) -> bool:
        return bool(self.source_landmarks and self.target_landmarks)


def read_pairs(table: str | Path) -> list[Pair]:
    """The pairs of an ANHIR pair table (paths relative to the table made absolute)."""
    table = Path(table)
    rows, columns = _read_table(table)
    missing = [c for c in (SOURCE_IMAGE, TARGET_IMAGE) if c not in columns]
    if missing:
        raise InputError(table, f"not a pair table: no column {', '.join(map(repr, missing))}")
    if (SOURCE_LANDMARKS in columns) != (TARGET_LANDMARKS in columns):
        raise InputError(
            table, f"pair table has only one of {SOURCE_LANDMARKS!r} and {TARGET_LANDMARKS!r}"
        )
    if not rows:
        raise InputError(table, "pair table has no pairs")
    width = max(3, len(str(len(rows) - 1)))
    return [_pair(table, number, row, width) for number, row in enumerate(rows)]


def _read_table(table: Path) -> tuple[list[dict[str, str]], list[str]]:
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [
                {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
                if any((v or "").strip() for v in row.values() if isinstance(v, str))
            ]
    except OSError as exc:
        raise InputError(table, f"cannot read the pair table: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(table, f"not a CSV pair table: {exc}") from exc
    return rows, columns


def _pair(table: Path, index: int, row: dict[str, str], width: int) -> Pair:
    line = index + 2  # the header is line 1
    source, target = row.get(SOURCE_IMAGE, ""), row.get(TARGET_IMAGE, "")
    if not source or not target:
        raise InputError(table, f"line {line}: empty {SOURCE_IMAGE!r} or {TARGET_IMAGE!r}")
    src_lm, tgt_lm = row.get(SOURCE_LANDMARKS, ""), row.get(TARGET_LANDMARKS, "")
    if bool(src_lm) != bool(tgt_lm):
        raise InputError(table, f"line {line}: only one of the two landmark files is given")
    base = table.parent
    return Pair(
        index=index,
        name=pair_name(index, source, target, width),
        source=str(_resolve(base, source)),
        target=str(_resolve(base, target)),
        source_landmarks=str(_resolve(base, src_lm)) if src_lm else None,
        target_landmarks=str(_resolve(base, tgt_lm)) if tgt_lm else None,
        metadata={k: v for k, v in row.items() if k not in KNOWN_COLUMNS},
    )


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).absolute()


def slide_stem(path: str | Path) -> str:
    """A slide's name without its (multi-part) suffix: ``a/b.ome.tif`` -> ``b``."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".ome.zarr/"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def slug(text: str, limit: int = NAME_PART) -> str:
    """``text`` reduced to file-name-safe characters (letters, digits, ``._-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return cleaned[:limit].rstrip("._-") or "slide"


def pair_name(index: int, source: str, target: str, width: int = 3) -> str:
    """Folder name of row ``index``: ``007-<source stem>-to-<target stem>`` (unique by row)."""
    return f"{index:0{width}d}-{slug(slide_stem(source))}-to-{slug(slide_stem(target))}"


# --------------------------------------------------------------------------------------------
# Landmarks and rTRE
# --------------------------------------------------------------------------------------------
@dataclass
class Landmarks:
    """Corresponding landmarks of a pair (first ``min(n_source, n_target)``) and the target
    diagonal (level-0 pixels)."""

    source: np.ndarray
    target: np.ndarray
    diagonal: float


def landmarks(
    source_landmarks: str | Path, target_landmarks: str | Path, target_image: str | Path
) -> Landmarks:
    """Read a pair's landmarks; the diagonal is that of the target slide's level 0."""
    src, tgt = read_landmarks(source_landmarks), read_landmarks(target_landmarks)
    n = min(len(src), len(tgt))
    h, w = open_slide(target_image).level_shape(0)
    return Landmarks(src[:n], tgt[:n], target_diagonal((h, w)))


def target_diagonal(shape: tuple[int, int]) -> float:
    """Diagonal of a level-0 ``(H, W)`` in pixels."""
    return float(np.hypot(*shape))


def rtre(mapped: np.ndarray, target: np.ndarray, diagonal: float) -> np.ndarray:
    """Relative target registration errors ``|mapped - target| / diagonal`` per landmark."""
    return np.linalg.norm(mapped - target, axis=1) / diagonal


def landmark_metrics(transform: Transform, marks: Landmarks) -> dict[str, Any]:
    """ANHIR metrics of a registration's transform on a pair's landmarks (see the module
    docstring): rTRE, that of its affine stage alone, robustness, and TRE in micrometres where
    the target's mpp is known."""
    mpp = transform.target.mpp
    mapped, residual = transform.map_points_with_residual(marks.source, "source_to_target")
    errors = rtre(mapped, marks.target, marks.diagonal)
    before = rtre(marks.source, marks.target, marks.diagonal)
    metrics: dict[str, Any] = dict.fromkeys(METRICS)
    metrics["n_landmarks"] = len(errors)
    if len(errors):
        metrics.update(
            median_rtre=float(np.median(errors)),
            mean_rtre=float(errors.mean()),
            max_rtre=float(errors.max()),
            median_rtre_before=float(np.median(before)),
            robustness=float(np.mean(errors < before)),
            inverse_residual_px_max=float(residual.max()),
        )
    if len(errors):
        alone = Transform.from_affine(transform.initial_affine, transform.target, transform.source)
        affine_mapped = alone.map_points(marks.source, "source_to_target")
        metrics["affine_median_rtre"] = float(
            np.median(rtre(affine_mapped, marks.target, marks.diagonal))
        )
    if mpp and len(errors):
        microns = np.hypot(
            (mapped[:, 0] - marks.target[:, 0]) * mpp[0],
            (mapped[:, 1] - marks.target[:, 1]) * mpp[1],
        )
        metrics.update(
            median_tre_um=float(np.median(microns)),
            mean_tre_um=float(microns.mean()),
            max_tre_um=float(microns.max()),
        )
    return metrics


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and mean over pairs of the per-pair median rTRE and of the robustness."""
    medians = [r["median_rtre"] for r in rows if r.get("median_rtre") is not None]
    robust = [r["robustness"] for r in rows if r.get("robustness") is not None]
    return {
        "pairs_evaluated": len(medians),
        "median_of_medians_rtre": _stat(statistics.median, medians),
        "mean_of_medians_rtre": _stat(statistics.fmean, medians),
        "median_robustness": _stat(statistics.median, robust),
        "mean_robustness": _stat(statistics.fmean, robust),
    }


def _stat(function: Callable[[list[float]], float], values: list[float]) -> float | None:
    return float(function(values)) if values else None


# --------------------------------------------------------------------------------------------
# Results folders
# --------------------------------------------------------------------------------------------
def evaluate_pair(pair: Pair, folder: str | Path) -> dict[str, Any]:
    """Metrics of one pair from its ``register`` output ``folder`` (status ``ok``,
    ``missing`` when the folder does not exist, ``no landmarks``, or ``failed`` with the
    error when the folder or the landmarks cannot be read)."""
    folder = Path(folder)
    row: dict[str, Any] = {"index": pair.index, "name": pair.name, "status": "ok", "error": ""}
    row.update(dict.fromkeys(METRICS))
    if not folder.is_dir():
        return {**row, "status": "missing"}
    if not pair.has_landmarks:
        return {**row, "status": "no landmarks"}
    try:
        transform = Transform.load(folder / "transform")
        marks = landmarks(pair.source_landmarks, pair.target_landmarks, pair.target)
        row.update(landmark_metrics(transform, marks))
    except WsiregError as exc:
        return {**row, "status": "failed", "error": str(exc)}
    return row


def evaluate(
    pairs_csv: str | Path,
    results: str | Path,
    json_out: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """ANHIR metrics of every pair of ``pairs_csv`` whose folder exists under ``results`` (a
    :func:`wsireg.run.batch.batch` output). Returns ``{"pairs": [...], "summary": {...}}`` and
    writes it as JSON to ``json_out`` when given (staged; replaced only with ``overwrite``)."""
    results = Path(results)
    if not results.is_dir():
        raise InputError(results, "no such results directory")
    pairs = read_pairs(pairs_csv)
    if pairs and not any((results / pair.name).is_dir() for pair in pairs):
        raise InputError(
            results, f"no pair of {Path(pairs_csv).name} has a folder here: not its batch output"
        )
    rows = [evaluate_pair(pair, results / pair.name) for pair in pairs]
    document = {
        "pairs_csv": str(Path(pairs_csv).absolute()),
        "results": str(results.absolute()),
        "pairs": rows,
        "summary": summarize([r for r in rows if r["status"] == "ok"]),
    }
    if json_out is not None:
        write_json(json_out, document, overwrite)
    return document


def write_json(path: str | Path, document: Any, overwrite: bool = False) -> Path:
    """Write ``document`` as JSON to ``path``, staged (never half-written)."""
    with staged_output(path, overwrite) as stage:
        stage.write_text(json.dumps(_plain(document), indent=2) + "\n")
    return Path(path)


def _plain(value: Any) -> Any:
    """JSON-safe copy: NaN/inf as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A plain-text table of per-pair metrics (rTRE in %) and the summary lines."""
    width = min(64, max([4, *(len(r["name"]) for r in rows)]))
    header = f"{'pair':<{width}} {'status':<12} {'n':>4} {'median%':>8} {'mean%':>8} "
    header += f"{'max%':>8} {'before%':>8} {'affine%':>8} {'robust':>6} {'TRE um':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['name'][:width]:<{width}} {row['status']:<12} "
            f"{_cell(row['n_landmarks'], 4, '')} {_cell(row['median_rtre'], 8, '%')} "
            f"{_cell(row['mean_rtre'], 8, '%')} {_cell(row['max_rtre'], 8, '%')} "
            f"{_cell(row['median_rtre_before'], 8, '%')} "
            f"{_cell(row['affine_median_rtre'], 8, '%')} {_cell(row['robustness'], 6, 'f')} "
            f"{_cell(row['median_tre_um'], 8, 'f')}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{summary['pairs_evaluated']} pairs: median of medians rTRE "
        f"{_cell(summary['median_of_medians_rtre'], 0, '%').strip()} %, mean of medians "
        f"{_cell(summary['mean_of_medians_rtre'], 0, '%').strip()} %; robustness median "
        f"{_cell(summary['median_robustness'], 0, 'f').strip()}, mean "
        f"{_cell(summary['mean_robustness'], 0, 'f').strip()}"
    )
    return "\n".join(lines)


def _cell(value: Any, width: int, kind: str) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if kind == "%":
        return f"{100 * value:>{width}.3f}"
    if kind == "f":
        return f"{value:>{width}.3f}"
    return f"{value:>{width}}"


__all__ = [
    "Landmarks",
    "Pair",
    "evaluate",
    "evaluate_pair",
    "landmark_metrics",
    "landmarks",
    "read_pairs",
    "rtre",
    "summarize",
]
