"""The package's layers only look down: every import inside ``wsireg`` (module level or in a
function) goes to the same or a lower layer, and nothing in ``wsireg`` imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsireg"

#: Subpackages from the bottom up; a module may import its own layer and those before it.
LAYERS = ("core", "io", "synthetic", "model", "engine", "run")
#: Modules at the package root that every layer may use; they import no subpackage.
BASE = ("errors", "progress")


def _layer(module: str) -> int | None:
    """Layer index of a ``wsireg.<sub>...`` module name, -1 for the base, None for others."""
    parts = module.split(".")
    if parts[0] != "wsireg":
        return None
    if len(parts) == 1 or parts[1] in BASE:
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import statement in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if node.module is None or node.level:
                # `from . import x` may name submodules: check each
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        name = _module_name(path)
        assert _layer(name) is not None, f"{name} is in no layer: add it to LAYERS or BASE"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_only_look_down(path):
    name = _module_name(path)
    own = _layer(name)
    bad = []
    for line, target in _imports(path):
        if target.split(".")[0] == "wsireg_cli":
            bad.append(f"line {line}: {target} (the library never imports the CLI)")
        layer = _layer(target)
        if layer is None or target == "wsireg":
            continue
        if own == -1 and layer >= 0:
            bad.append(f"line {line}: {target} (a base module imports no subpackage)")
        elif layer > own:
            bad.append(f"line {line}: {target} ({LAYERS[layer]} is above {LAYERS[own]})")
    assert not bad, f"{name} imports upwards:\n" + "\n".join(bad)
