"""Deprecated: moved to :mod:`tokenthrift.ltm.registry` (kept for one release)."""
from .._deprecated import moved

__getattr__ = moved(__name__, "tokenthrift.ltm.registry")
