"""`kclub run` under trouble: a failing cell, a cell past its timeout, a dead kernel and Ctrl-C
each save the partly executed notebook and name the cell; the lab's tqdm bars come through; a
run that records nothing does not show the previous run's claims as its own; a KeyError inside a
benchmark is not reported as an unknown slug."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared import claims, cli, labs
from shared.paths import ROOT


def make_lab(folder, *sources, bench=None):
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "outputs": [],
              "execution_count": None, "source": src} for i, src in enumerate(sources)]
    (folder / "trouble.ipynb").write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kclub": {"title": "Trouble", "papers": ["vllm"], "bench": bench}}}))


@pytest.fixture
def lab_dir(tmp_path, monkeypatch):
    folder = tmp_path / "labs"
    folder.mkdir()
    monkeypatch.setattr(labs, "LABS", folder)
    monkeypatch.setenv("KC_BUILD", str(tmp_path / "build"))
    return folder


def executed(tmp_path) -> list:
    nb = json.loads((tmp_path / "build" / "trouble" / "trouble.ipynb").read_text())
    return [c["execution_count"] for c in nb["cells"]]


def test_a_timeout_saves_the_partial_notebook_and_names_the_cell(lab_dir, tmp_path, capfd):
    make_lab(lab_dir, "from tqdm import tqdm\nfor _ in tqdm(range(3), desc='inner-bar'): pass",
             "import time\ntime.sleep(60)", "print('never')")
    assert cli.main(["run", "trouble", "--cell-timeout", "3"]) == 1
    err = capfd.readouterr().err
    assert "inner-bar" in err                                   # the lab's own progress
    assert "STOPPED at cell 1 ('import time'): timed out after 3 s" in err
    assert executed(tmp_path) == [1, 2, None]        # cell 0's output and cell 1's start kept


def test_a_dead_kernel_is_named(lab_dir, tmp_path, capfd):
    make_lab(lab_dir, "x = 1", "import os\nos._exit(3)", "print('never')")
    assert cli.main(["run", "trouble"]) == 1
    assert "STOPPED at cell 1 ('import os'): the kernel died" in capfd.readouterr().err
    assert executed(tmp_path)[0] == 1


def test_no_claims_this_run_means_none_shown(lab_dir, tmp_path, capfd):
    before = claims.Recorder("trouble")
    before.info("an old number", 1.0, unit="x", method="planted")
    before.finish()
    make_lab(lab_dir, "assert 1 + 1 == 3, 'planted failure'")
    assert cli.main(["run", "trouble"]) == 1
    out, err = capfd.readouterr()
    assert "this run recorded no claims" in out and "an old number" not in out
    assert "STOPPED at cell 0" in err and "planted failure" in err


def test_a_keyerror_in_a_benchmark_is_not_an_unknown_slug(lab_dir, tmp_path, monkeypatch):
    (tmp_path / "kc_trouble_bench.py").write_text("def main():\n    return {}['missing']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    make_lab(lab_dir, "x = 1", bench="kc_trouble_bench")
    with pytest.raises(KeyError, match="missing"):
        cli.main(["bench", "trouble"])
    assert cli.main(["bench", "no-such-lab"]) == 2             # a real unknown slug still is


def test_ctrl_c_saves_the_partial_notebook(tmp_path):
    """SIGINT to a real `kclub run` process, while a cell sleeps."""
    folder = tmp_path / "labs"
    folder.mkdir()
    make_lab(folder, "x = 1", "import sys, time\nprint('sleeping', file=sys.stderr)\n"
             "time.sleep(60)", "print('never')")
    code = (f"import sys; from shared import labs, cli; from pathlib import Path; "
            f"labs.LABS = Path({str(folder)!r}); sys.exit(cli.main(['run', 'trouble']))")
    # as from a shell: SIGINT at its default, which Python turns into KeyboardInterrupt (a
    # pytest-xdist worker ignores SIGINT, and an ignored SIGINT is inherited and kept)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            env={**os.environ, "KC_BUILD": str(tmp_path / "build")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = "", time.monotonic() + 60
    while "sleeping" not in seen:                               # the forwarded stderr
        assert time.monotonic() < deadline and proc.poll() is None, seen
        seen += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "STOPPED at cell 1 ('import sys, time'): interrupted (Ctrl-C)" in err
    assert executed(tmp_path)[0] == 1
