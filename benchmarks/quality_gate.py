"""The quality gate of ``register`` (:func:`wsireg.run.register.quality_gate`) on real section
pairs and on pairs of unrelated tissues: its two measures per pair and the verdict.

Data: every pair of ``../shared/data/anhir-5pc`` and ``../shared/data/anhir-lobes`` (real
serial sections: the gate must pass them) and :data:`UNRELATED`, sections of different tissues
(it must fail them). The gate's thresholds lie between the two groups.

Run: ``python benchmarks/quality_gate.py [--set KEY=VALUE ...]`` (``--set``: any
:class:`~wsireg.run.settings.RegisterOptions` field, e.g. ``weights=none``). Prints one line per
pair (final local NCC, tissue Dice, verdict) and the range of each measure per group.
"""

from __future__ import annotations

import argparse
import ast
import tempfile
from pathlib import Path
from typing import Any

from wsireg.progress import set_quiet
from wsireg.run.evaluate import read_pairs
from wsireg.run.register import MIN_SIMILARITY, MIN_TISSUE_OVERLAP, register

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KIDNEY = "anhir-5pc/rat-kidney_/scale-5pc/Rat-Kidney_"
LESIONS = "anhir-5pc/lesions_/scale-5pc/Izd2-29-041-w35_"
LOBES = "anhir-lobes/lung-lobes_1/"
#: Pairs of different tissues (source, target), relative to ``../shared/data``; sizes within
#: the 1.5x that unknown pixel sizes allow.
UNRELATED = [
    (f"{KIDNEY}PanCytokeratin.jpg", f"{LESIONS}HE.jpg"),
    (f"{LESIONS}proSPC.jpg", f"{KIDNEY}HE.jpg"),
    (f"{KIDNEY}PanCytokeratin.jpg", f"{LOBES}1-he.png"),
    (f"{LESIONS}proSPC.jpg", f"{LOBES}1-he.png"),
    (f"{LOBES}3-pro-spc.png", f"{LESIONS}HE.jpg"),
]
TABLES = ("anhir-5pc/pairs.csv", "anhir-lobes/pairs.csv")


def real_pairs(data: Path) -> list[tuple[str, str]]:
    """(source, target) of every pair of :data:`TABLES`, relative to ``data``."""
    pairs = [p for table in TABLES for p in read_pairs(data / table)]
    return [
        (str(Path(p.source).relative_to(data)), str(Path(p.target).relative_to(data)))
        for p in pairs
    ]


def verdicts(data: Path, options: dict[str, Any]) -> dict[tuple[str, str, str], dict]:
    """``(group, source, target)`` -> the ``quality`` entry of its ``report.json``."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        groups = (("real", real_pairs(data)), ("unrelated", UNRELATED))
        for group, pairs in groups:
            for number, (source, target) in enumerate(pairs):
                out = Path(tmp) / f"{group}-{number}"
                result = register(data / source, data / target, out, **options)
                found[(group, source, target)] = result.report["quality"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    options: dict[str, Any] = {"write_warped": False}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    set_quiet(True)
    found = verdicts(args.data, options)
    print(f"thresholds: similarity >= {MIN_SIMILARITY}, tissue overlap >= {MIN_TISSUE_OVERLAP}")
    for (group, source, target), q in found.items():
        verdict = "plausible" if q["plausible"] else "implausible"
        print(
            f"{group:9} {q['similarity']:6.3f} {q['tissue_overlap']:6.3f} {verdict:11} "
            f"{Path(source).name} -> {Path(target).name}"
        )
    for group in ("real", "unrelated"):
        qs = [q for (g, _, _), q in found.items() if g == group]
        sims, dice = [q["similarity"] for q in qs], [q["tissue_overlap"] for q in qs]
        right = sum(q["plausible"] == (group == "real") for q in qs)
        print(
            f"{group}: {len(qs)} pairs, similarity {min(sims):.3f}-{max(sims):.3f}, "
            f"tissue overlap {min(dice):.3f}-{max(dice):.3f}, {right}/{len(qs)} judged right"
        )


if __name__ == "__main__":
    main()
