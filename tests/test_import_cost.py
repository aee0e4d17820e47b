"""``import tokenthrift`` (what a user patching a timm model imports) pulls in no training engine, data layer or
entry point: the layer contracts say so for static imports (lint-imports), this checks it at run time too."""
import subprocess
import sys


def test_import_tokenthrift_loads_no_engine_data_or_entry_point():
    code = ("import sys, tokenthrift, tokenthrift.revit, tokenthrift.ltm, tokenthrift.toe, tokenthrift.tome; "
            "print(sorted(m for m in sys.modules if m.startswith(('tokenthrift.train', 'tokenthrift.apps', "
            "'tokenthrift.data'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
