"""Generators: one module per method, each exposing `Config`, `Generator` and `Sampler`."""
from __future__ import annotations

from types import ModuleType

from privsynth.errors import UsageError

METHODS = ("dp-mepf", "privimage")


def method_module(name: str) -> ModuleType:
    """The module implementing method `name`."""
    if name == "dp-mepf":
        from privsynth.generators import dpmepf

        return dpmepf
    if name == "privimage":
        from privsynth.generators import privimage

        return privimage
    raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
