"""The public face of the package: ``wsireg.<name>`` is always the function or class (never a
submodule of the same name), the package is typed, and every third-party module wsireg or its
CLI imports is a declared dependency of the distribution."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import wsireg

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
#: Where the installed code lives: the import package and the CLI (package ``wsireg_cli``).
CODE = (REPO / "wsireg", REPO / "cli")
FIRST_PARTY = {"wsireg", "wsireg_cli"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads(PYPROJECT.read_text())


def test_public_names_are_the_objects_even_after_every_submodule_is_imported() -> None:
    for module in pkgutil.walk_packages(wsireg.__path__, "wsireg."):
        importlib.import_module(module.name)
    children = {m.name for m in pkgutil.iter_modules(wsireg.__path__)}
    public = [name for name in wsireg.__all__ if name != "__version__"]
    assert not children & set(public), "a submodule would shadow a public name"
    for name in public:
        value = getattr(wsireg, name)
        assert not inspect.ismodule(value), name
        assert value is getattr(importlib.import_module(wsireg._LAZY[name]), name)
    assert callable(wsireg.warp) and callable(wsireg.register) and callable(wsireg.open_slide)
    assert inspect.isclass(wsireg.Transform)
    assert "warp" in dir(wsireg)


def test_the_package_is_typed() -> None:
    assert (REPO / "wsireg" / "py.typed").is_file()
    data = _pyproject()["tool"]["setuptools"]["package-data"]["wsireg"]
    assert "py.typed" in data


def _imported_top_level_modules() -> set[str]:
    """Top-level names of every import (also inside functions) under :data:`CODE`."""
    names: set[str] = set()
    for root in CODE:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def _normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_every_imported_third_party_module_is_a_declared_dependency() -> None:
    project = _pyproject()["project"]
    declared = {
        _normalised(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
        for requirement in project["dependencies"]
    }
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        distributions = {_normalised(d) for d in providers.get(module, [])}
        assert distributions, f"{module} is imported but not installed"
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not in [project].dependencies: {missing}"


def test_the_distribution_name_is_our_own() -> None:
    # `pip install wsireg` installs an unrelated project: ours is published under another name
    project = _pyproject()["project"]
    assert project["name"] == "wsireg-deephist"
    assert project["scripts"]["wsireg"] == "wsireg_cli.main:main"
