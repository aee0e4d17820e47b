"""The command line, ``tokenthrift <command>``: assembled from :data:`COMMANDS`, one module per subcommand.

Each subcommand lives in its own module of :mod:`tokenthrift.apps`, which owns all of it: ``HELP`` (its line in
``tokenthrift --help``), ``add_arguments(parser)`` (its flags, added to its subparser) and ``run(args)`` (its work).
What several share is written once in :mod:`.common` (the runtime flags, the flags that describe a model to build,
a checkpoint or a model built from flags). This module only assembles them and runs the one asked for: **a new
subcommand is one new module and one row in** :data:`COMMANDS` (tests/test_cli_commands.py checks that the table is
the only registry).

A flag that does not apply to what was asked (one method's option for another method's run, a model flag with a
checkpoint, ...) is an error, never silently ignored. The methods' flags, help texts and the ``compare``
off-the-shelf values come from the registered adapters (:data:`tokenthrift.train.methods.METHODS`); only ReViT's
own ``assign-labels`` and ``adaptive`` and the scripted ``demo`` are about one method. Mistakes
(:class:`tokenthrift.errors.TokenthriftError` and missing files) print as one line; anything else is a bug and
keeps its traceback. ``--debug`` (anywhere on the line) shows the traceback of a mistake too. Warnings print as one
line each, once; tokenthrift's own (:class:`tokenthrift.errors.TokenthriftWarning`) are the command's messages and
show even under ``-W ignore``. An argument the subcommand does not know is that subcommand's error, under its usage
line.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import TokenthriftError, TokenthriftWarning
from . import (
    adaptive,
    assign_labels,
    bench,
    compare,
    demo,
    evaluation,
    export,
    macs,
    make_collage,
    recipes,
    train,
    visualize,
)

#: Every subcommand, in the order ``tokenthrift --help`` lists them: the name typed on the command line and the
#: module that owns it (``HELP``, ``add_arguments``, ``run``). The only registry of subcommands.
COMMANDS = {
    "train": train,
    "eval": evaluation,
    "adaptive": adaptive,
    "assign-labels": assign_labels,
    "macs": macs,
    "bench": bench,
    "export": export,
    "visualize": visualize,
    "demo": demo,
    "compare": compare,
    "make-collage": make_collage,
    "recipes": recipes,
}


class _Command(argparse.ArgumentParser):
    """A subcommand's parser: a mistake on its line (an unknown flag, a bad value, a missing argument) is one line,
    as every other mistake is, pointing at the subcommand's ``--help`` (its usage runs to dozens of lines)."""

    def error(self, message):
        hint = "" if "--help" in message else f" ({self.prog} --help lists its flags)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an argument that the chosen subcommand does not know is that subcommand's error
    (argparse leaves it to the top level, whose usage lists the commands instead)."""
    commands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per row of :data:`COMMANDS`, each given its module's flags and its
    ``run`` as ``func``."""
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug must not reset a --debug given before it
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors")
    parser = _Parser(prog="tokenthrift", description="Spend fewer tokens in timm ViTs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    parser.commands = sub.choices  # name -> subcommand parser, filled as they are added
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, parents=[debug])
        p.set_defaults(func=module.run)
        module.add_arguments(p)
    return parser


def _show_warnings(prefix: str, debug: bool) -> None:
    """Inside ``warnings.catch_warnings()``: every warning shown once, as a short line ``<prefix>: warning: ...``
    as an error is (``debug``: Python's own format, with file and line). Tokenthrift's own warnings are this
    command's messages, not a library's notes to its programmer: they show whatever ``-W`` / ``PYTHONWARNINGS``
    say; other libraries' warnings follow Python's filters."""
    warnings.simplefilter("always", TokenthriftWarning)  # first in the filter list, so it wins over an "ignore"
    python_format, shown = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) in shown:  # a message repeated (each split, each export) is said once
            return
        shown.add((category, str(message)))
        if debug:
            python_format(message, category, filename, lineno, file, line)
        else:
            print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    """``tokenthrift`` (the console script, ``python -m tokenthrift``): parse ``argv`` (default: the process's
    arguments) and run the chosen subcommand's ``run``; a mistake exits with status 2 after one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # the top level's flags take no value
    with warnings.catch_warnings():  # from the parsing on: a renamed flag warns as it is read
        _show_warnings(f"tokenthrift {command}".rstrip(), debug="--debug" in argv)
        args = build_parser().parse_args(argv)
        try:
            args.func(args)
        except (TokenthriftError, OSError) as err:  # OSError: a file or folder the system refused (permissions,
            if args.debug:                           # a full or read-only disk, a file where a folder should be)
                raise
            print(f"tokenthrift {args.command}: error: {_message(err)}", file=sys.stderr)
            sys.exit(2)


def _message(err: BaseException) -> str:
    """A user error's message; for an operating-system error, what the system said and the path."""
    if isinstance(err, OSError) and not isinstance(err, TokenthriftError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err)


if __name__ == "__main__":
    main()
