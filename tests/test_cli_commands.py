"""The subcommand table is the only registry of subcommands (docs/architecture.md, "Adding a subcommand"): every
module of ``tokenthrift.apps`` that defines a subcommand (``HELP``, ``add_arguments``, ``run``) is a row of
``cli.COMMANDS`` and every row's module defines all three, ``cli.py`` only assembles them (the one ``add_parser``),
and ``tokenthrift --help`` lists exactly the table's commands, in its order, each with its module's ``HELP``."""
import ast
import re
from pathlib import Path

import pytest

from tokenthrift.apps import cli
from tokenthrift.apps.cli import COMMANDS, main

APPS = Path(cli.__file__).parent
INTERFACE = {"HELP", "add_arguments", "run"}


def _defined(path: Path) -> set[str]:
    """The names of the subcommand interface that a module defines at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names & INTERFACE


def test_every_subcommand_module_is_a_row_of_the_table():
    modules = {p.stem: _defined(p) for p in sorted(APPS.rglob("*.py"))}
    subcommands = {name for name, defined in modules.items() if defined}
    in_table = {module.__name__.rsplit(".", 1)[1] for module in COMMANDS.values()}
    assert subcommands == in_table, "a module defines a subcommand the table does not name, or the reverse"
    for name in subcommands:  # all of it, not a part
        assert modules[name] == INTERFACE, f"apps/{name}.py defines {sorted(modules[name])}, not {sorted(INTERFACE)}"
    assert len({id(m) for m in COMMANDS.values()}) == len(COMMANDS)  # one module per subcommand
    for module in COMMANDS.values():
        assert isinstance(module.HELP, str) and module.HELP and callable(module.add_arguments) and callable(module.run)


def test_cli_only_assembles_the_table():
    """One subparser is added in the whole package, in cli.py's loop over the table."""
    calls = [(p.name, node.lineno) for p in sorted(APPS.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("add_parser", "add_subparsers")]
    assert [name for name, _ in calls] == ["cli.py", "cli.py"], calls
    assert not _defined(APPS / "cli.py")


def test_help_lists_exactly_the_tables_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"\{([^}]*)\}", out).group(1).split(",") == list(COMMANDS)  # the usage's choices
    listed: dict[str, list[str]] = {}
    section = out.split("positional arguments:", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # after the {...} line
    for line in section:
        entry = re.match(r"^ {4}(\S+)(.*)$", line)
        if entry:
            listed[entry.group(1)] = [entry.group(2)]
        else:
            listed[list(listed)[-1]].append(line)
    assert list(listed) == list(COMMANDS)
    for name, module in COMMANDS.items():  # (wrapped, also at hyphens: compared without the white space)
        assert "".join("".join(listed[name]).split()) == "".join(module.HELP.split()), name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_its_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tokenthrift {name} ") and "--debug" in out
