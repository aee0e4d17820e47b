"""benchmarks/: every script imports without running anything and answers --help, so a script that no longer
imports (a library name moved or gone) fails here, not at the start of a long run; and benchmarks/suite.py, the
helpers they share (no training: the reuse and resume decisions only)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "suite.py")
SHELL_SCRIPTS = sorted(p.name for p in BENCH.glob("*.sh"))
HELP_TIMEOUT = 120  # seconds; an answer is immediate (the script is imported already), a script that starts its work hangs


def load(path: Path):
    """Import a file of benchmarks/ as a module, as ``python benchmarks/X.py`` would find its imports."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_help(command: list[str]) -> subprocess.CompletedProcess:
    try:  # the environment passed as a copy: the child does not read this process's while another thread runs
        return subprocess.run(command, capture_output=True, text=True, timeout=HELP_TIMEOUT, cwd=ROOT,
                              env=dict(os.environ), check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, -1, "", f"no answer in {HELP_TIMEOUT} s: does --help start the work?")


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # what `python benchmarks/X.py` does: the scripts import suite
    yield
    sys.modules.pop("suite", None)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name, bench_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, "--not-a-flag"])  # a script that parses at import exits: caught below
    module = failure = None
    try:
        module = load(BENCH / name)
    except SystemExit as stop:
        failure = (f"benchmarks/{name} runs on import (it parsed the command line and exited with {stop.code}): "
                   "put the work in main(), called under `if __name__ == '__main__':`")
    except Exception as err:  # noqa: BLE001 (whatever fails on import is the failure reported)
        failure = f"benchmarks/{name} fails on import: {type(err).__name__}: {err}\n\n{traceback.format_exc()[-3000:]}"
    if failure:
        pytest.fail(failure, pytrace=False)
    assert callable(getattr(module, "main", None)), f"benchmarks/{name} has no main()"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name, bench_path, monkeypatch, capsys):
    """``python benchmarks/X.py --help`` in this process (the script's folder on the path, as Python puts it there):
    its ``main()`` prints the usage and exits 0; one that starts its work instead is stopped after HELP_TIMEOUT."""
    module = load(BENCH / name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])

    def stop(*_):
        raise TimeoutError(f"benchmarks/{name} --help gave no answer in {HELP_TIMEOUT} s: does it start the work?")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(HELP_TIMEOUT)
    try:
        with pytest.raises(SystemExit) as done:
            module.main()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    assert done.value.code in (0, None), f"benchmarks/{name} --help exited with {done.value.code}:\n{out.err[-4000:]}"
    assert out.out.startswith("usage:"), f"benchmarks/{name} --help printed no usage:\n{out.out[:2000]}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_shell_script_help(name):
    done = run_help(["bash", str(BENCH / name), "--help"])
    assert done.returncode == 0, f"bash benchmarks/{name} --help exited with {done.returncode}:\n{done.stderr}"
    assert done.stdout.startswith("usage:"), f"bash benchmarks/{name} --help printed no usage:\n{done.stdout}"


def test_write_result(tmp_path, bench_path):
    suite = load(BENCH / "suite.py")
    rows, means = [{"run": "a", "top1": 90.0}], [{"kind": "a", "seeds": 2}]
    md = suite.write_result(tmp_path / "out" / "bench_v1.5", {"date": "today"}, {"rows": rows, "means": means},
                            "## first", rows, means)
    assert json.loads((tmp_path / "out" / "bench_v1.5.json").read_text()) == {
        "meta": {"date": "today"}, "rows": rows, "means": means}
    assert (tmp_path / "out" / "bench_v1.5.md").read_text() == md
    assert md == ('{"date": "today"}\n\n## first\n\n| run | top1 |\n|---|---|\n| a | 90 |\n\n'
                  '| kind | seeds |\n|---|---|\n| a | 2 |\n')
    assert suite.write_result(tmp_path / "json_only", {}, {"rows": rows}) == ""
    assert not (tmp_path / "json_only.md").exists()
    suite.write_result(tmp_path / "md_only", {}, None, rows)
    assert not (tmp_path / "md_only.json").exists() and (tmp_path / "md_only.md").exists()


def test_run_or_reuse(tmp_path, bench_path, monkeypatch):
    from tokenthrift.train import TrainConfig

    suite = load(BENCH / "suite.py")
    trained = []
    monkeypatch.setattr(suite, "train", lambda cfg: trained.append(cfg) or {"trained": cfg.name})
    cfg = TrainConfig(output=str(tmp_path), name="run", epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(b"")
    assert suite.run_or_reuse(cfg) == {"trained": "run"} and trained[-1].resume is None
    assert suite.run_or_reuse(cfg, resume=True) == {"trained": "run"}
    assert trained[-1].resume == str(run_dir / "last.pth") and cfg.resume is None  # the caller's cfg untouched
    (run_dir / "summary.json").write_text(json.dumps({"top1": 91.5}))
    assert suite.run_or_reuse(cfg, resume=True) == {"top1": 91.5} and len(trained) == 2
