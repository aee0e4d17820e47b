"""The package's shape: old import paths still work for one release (with a warning) and a method library
pulls in nothing above it (the layer contracts themselves: lint-imports, run by make test)."""
import importlib
import subprocess
import sys

import pytest

MOVED = [
    ("tokenthrift.cli", "main", "tokenthrift.apps.cli"),
    ("tokenthrift.demo", "run_demo", "tokenthrift.apps.demo"),
    ("tokenthrift.bench", "toe_speed_rows", "tokenthrift.apps.bench"),
    ("tokenthrift.report", "table", "tokenthrift.apps.report"),
    ("tokenthrift.viz", "plot_merge_maps", "tokenthrift.apps.viz"),
    ("tokenthrift.revit.methods", "ReViTMethod", "tokenthrift.train.methods"),
    ("tokenthrift.revit.pipeline", "label_split", "tokenthrift.apps.labels"),
    ("tokenthrift.ltm.methods", "LTMMethod", "tokenthrift.train.methods.ltm"),
    ("tokenthrift.ltm.models", "calibrate_ratio", "tokenthrift.ltm.registry"),
    ("tokenthrift.train.models", "build_model", "tokenthrift.train.build"),
]


@pytest.mark.parametrize("old,name,new", MOVED)
def test_old_import_paths_warn_and_resolve(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_method_libraries_do_not_import_the_engine_or_the_entry_points():
    code = ("import sys, tokenthrift, tokenthrift.revit.methods, tokenthrift.ltm.models; "
            "print(sorted(m for m in sys.modules if m.startswith(('tokenthrift.train', 'tokenthrift.apps', "
            "'tokenthrift.data'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
