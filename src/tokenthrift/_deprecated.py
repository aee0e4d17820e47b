"""Old import paths kept for one release: a moved module's old name resolves its attributes from the new
module, with a DeprecationWarning that names the new path.

The new module is imported on first attribute access (a module ``__getattr__``), not when the old
module is imported: importing a method library must not pull in the training engine or the entry points
above it (the layer contracts in pyproject.toml).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that warns and returns ``getattr(new_module, name)``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(f"{old} moved to {new}; the old import path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
