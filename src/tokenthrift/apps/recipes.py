"""``tokenthrift recipes``: the names of the shipped recipes (``train --config NAME``)."""
from __future__ import annotations

import argparse

from ..train.config import recipe_names

HELP = "list the shipped recipes (use with train --config NAME)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No flags of its own."""


def run(args: argparse.Namespace) -> None:
    for name in recipe_names():
        print(name)
