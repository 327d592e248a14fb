"""The method registry: each module in this package defines one method (a :class:`~.base.Method`) and registers
it. ``get(name)``, ``names()`` and ``resolve(config)`` are what the rest of dgq uses."""

import importlib
import pkgutil

from .base import REGISTRY, Method, get, names, register, resolve

for _m in pkgutil.iter_modules(__path__):  # every method module registers itself when imported
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REGISTRY", "Method", "get", "names", "register", "resolve"]
