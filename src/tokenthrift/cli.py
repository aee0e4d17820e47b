"""Deprecated: moved to :mod:`tokenthrift.apps.cli` (kept for one release)."""
from ._deprecated import moved

__getattr__ = moved(__name__, "tokenthrift.apps.cli")
