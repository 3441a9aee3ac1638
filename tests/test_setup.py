"""`make setup` on machines unlike this one: an old Python, or one that cannot make a venv, gets
a message saying what to install, and no half-made .venv is left to be reused."""

import shutil
import subprocess
from pathlib import Path

from shared.paths import ROOT


def fake_python(tmp: Path, version: str, *, new_enough: bool) -> Path:
    """A `python` that reports `version`, passes or fails the 3.11 check, and cannot make a
    venv (as on a Debian without python3-venv)."""
    exe = tmp / "fakepython"
    exe.write_text("#!/bin/sh\n"
                   f'case "$1" in -V) echo "Python {version}"; exit 0;; '
                   f'-c) exit {0 if new_enough else 1};; esac\nexit 1\n')
    exe.chmod(0o755)
    return exe


def make_setup(tmp: Path, python: Path) -> subprocess.CompletedProcess:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp / name)
    return subprocess.run(["make", "--no-print-directory", "setup", f"PYTHON={python}"],
                          cwd=tmp, capture_output=True, text=True, timeout=60)


def test_python_3_10_gets_a_message_and_no_venv(tmp_path):
    run = make_setup(tmp_path, fake_python(tmp_path, "3.10.12", new_enough=False))
    assert run.returncode != 0
    assert "needs Python 3.11 or newer" in run.stdout and "3.10.12" in run.stdout
    assert "make PYTHON=python3.11 setup" in run.stdout
    assert not (tmp_path / ".venv").exists()


def test_a_half_made_venv_is_removed_not_reused(tmp_path):
    half = tmp_path / ".venv" / "bin"
    half.mkdir(parents=True)
    (half / "python").symlink_to("/bin/false")        # a venv whose python and pip are broken
    run = make_setup(tmp_path, fake_python(tmp_path, "3.12.1", new_enough=True))
    assert run.returncode != 0
    assert "removing a half-made .venv" in run.stdout
    assert "-m venv' failed: install the venv module" in run.stdout
    assert not (tmp_path / ".venv").exists()
