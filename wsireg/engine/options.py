"""Option groups given as objects or as keyword arguments.

The library's entry points take their options as small frozen dataclasses
(:class:`wsireg.engine.warp.WarpOptions`, :class:`wsireg.engine.parallel.Execution`,
:class:`wsireg.run.settings.RegisterOptions`) and, for convenience, as keyword arguments that
override fields of them: ``warp(t, slide, out, level=1, workers=2)``. :func:`take_overrides`
moves the keywords naming a group's fields into a copy of the group; :func:`no_overrides_left`
rejects the rest as :func:`TypeError`, like an unknown keyword argument.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

G = TypeVar("G")


def take_overrides(base: G, overrides: dict[str, Any]) -> G:
    """``base`` with the fields named in ``overrides`` replaced; those keys are removed from
    ``overrides`` (so several groups can share one keyword dictionary)."""
    names = {f.name for f in fields(base)}  # type: ignore[arg-type]
    changes = {name: overrides.pop(name) for name in list(overrides) if name in names}
    return replace(base, **changes) if changes else base  # type: ignore[type-var]


def no_overrides_left(function: str, overrides: dict[str, Any]) -> None:
    """Raise :class:`TypeError` naming the keywords no option group took."""
    if overrides:
        names = ", ".join(sorted(overrides))
        raise TypeError(f"{function}() got unexpected keyword arguments: {names}")
