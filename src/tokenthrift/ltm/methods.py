"""Deprecated: moved to :mod:`tokenthrift.train.methods.ltm` (kept for one release)."""
from .._deprecated import moved

__getattr__ = moved(__name__, "tokenthrift.train.methods.ltm")
