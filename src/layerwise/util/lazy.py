"""Package attributes imported on first use, so that torch-free parts (the report, the
allocators, plan configs) can be imported without loading torch."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, where: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name -> the module it lives in; each name is
    imported once, then kept in `namespace` (the package's globals)."""
    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
