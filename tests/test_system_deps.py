"""The README's two commands set up a fresh machine: ``make test`` and ``make demo`` first run
``scripts/system-deps``, which installs the Debian packages they need as root, and otherwise stops with one line
that says exactly what to install; ``.ci/run`` calls the same step."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-deps"


def run(*packages: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    return subprocess.run(["sh", str(SCRIPT), *packages], capture_output=True, text=True, env=env)


def test_present_packages_pass_and_unknown_ones_are_refused():
    assert run("dataset-fashion-mnist", "ffmpeg").returncode == 0  # this machine has both (the suite needs them)
    bad = run("left-pad")
    assert bad.returncode == 2 and "unknown package left-pad" in bad.stderr


def test_a_user_without_root_gets_one_line_with_the_command(tmp_path):
    """A machine without FFmpeg's libraries, not root: nothing is installed, one line names the command."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")
    (fake / "ldconfig").write_text("#!/bin/sh\necho 'libc.so.6 (libc6,x86-64) => /lib/libc.so.6'\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    result = run("dataset-fashion-mnist", "ffmpeg", path=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == ("missing system packages: ffmpeg; install them first: sudo apt-get install -y "
                                     "ffmpeg (Debian/Ubuntu)")


def test_make_and_ci_run_the_step_before_any_work():
    makefile = (ROOT / "Makefile").read_text()
    assert "demo: system-deps-demo $(STAMP)" in makefile and "test: system-deps $(STAMP)" in makefile
    assert "make system-deps" in (ROOT / ".ci" / "run").read_text()
