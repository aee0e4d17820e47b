"""Deprecated: moved to :mod:`tokenthrift.apps.report` (kept for one release)."""
from ._deprecated import moved

__getattr__ = moved(__name__, "tokenthrift.apps.report")
