"""Errors that describe a user's mistake and how to fix it.

Each subclasses the built-in exception a caller would expect (``except ValueError`` keeps working), and
all of them subclass :class:`TokenthriftError`, which the command line prints as a one-line message. Any
other exception is a bug and keeps its traceback. :class:`TokenthriftWarning` is the category of tokenthrift's own
warnings (something done on the user's behalf, or worth their attention): the command line shows them whatever
Python's warning filters say.
"""
from __future__ import annotations

__all__ = ["TokenthriftError", "TokenthriftWarning", "InvalidArgumentError", "UnsupportedModelError",
           "MissingFileError", "StateError"]


class TokenthriftError(Exception):
    """A mistake in what tokenthrift was asked to do; the message says what is wrong and how to fix it."""


class InvalidArgumentError(TokenthriftError, ValueError):
    """A value (flag, recipe key, argument, file content) that tokenthrift cannot use."""


class UnsupportedModelError(TokenthriftError, TypeError):
    """A model or module of a kind that a method does not support."""


class MissingFileError(TokenthriftError, FileNotFoundError):
    """A dataset, checkpoint, label file or folder that is not where it was said to be."""


class StateError(TokenthriftError, RuntimeError):
    """An operation that does not fit the object's current state (e.g. converting a model twice)."""


class TokenthriftWarning(UserWarning):
    """A message for the user (a class missing from the evaluation split, a run folder taken, a knob clamped): the
    library warns with it, and the command line prints each as one line even under ``-W ignore``."""
