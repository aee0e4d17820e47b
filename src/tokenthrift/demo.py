"""Deprecated: moved to :mod:`tokenthrift.apps.demo` (kept for one release)."""
from ._deprecated import moved

__getattr__ = moved(__name__, "tokenthrift.apps.demo")
