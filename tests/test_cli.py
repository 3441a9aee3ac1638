"""`kclub` as a user meets it: list, unknown slugs, claims, strip."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from shared import cli, labs
from shared.paths import ROOT


def test_list(capsys):
    assert cli.main(["list"]) == 0
    assert "online-softmax" in capsys.readouterr().out


def test_unknown_slug_lists_the_valid_ones(capsys):
    assert cli.main(["run", "no-such-lab"]) == 2
    err = capsys.readouterr().err
    assert "no lab 'no-such-lab'" in err and "online-softmax" in err


def test_claims_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KC_BUILD", str(tmp_path))
    assert cli.main(["claims"]) == 0
    assert "no claims yet" in capsys.readouterr().out


@pytest.fixture
def lab_copy(tmp_path, monkeypatch):
    """online-softmax copied into a scratch labs/ folder, with a scratch build/."""
    labs_dir = tmp_path / "labs"
    labs_dir.mkdir()
    shutil.copy(labs.get("online-softmax").notebook, labs_dir)
    monkeypatch.setattr(labs, "LABS", labs_dir)
    monkeypatch.setenv("KC_BUILD", str(tmp_path / "build"))
    return labs.get("online-softmax")


def test_strip_needs_a_run(lab_copy):
    assert cli.main(["strip", "online-softmax"]) == 1   # a checked cell, nothing executed


def test_strip_keeps_checked_outputs(lab_copy, tmp_path):
    executed = json.loads(lab_copy.notebook.read_text())
    for cell in executed["cells"]:
        if cell["cell_type"] == "code":
            cell["execution_count"] = 3
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]},
                               {"output_type": "stream", "name": "stderr", "text": ["noise"]}]
    out = tmp_path / "build" / lab_copy.slug
    out.mkdir(parents=True)
    (out / f"{lab_copy.slug}.ipynb").write_text(json.dumps(executed))
    assert cli.main(["strip", "online-softmax"]) == 0
    stripped = json.loads(lab_copy.notebook.read_text())
    kept = 0
    for cell in stripped["cells"]:
        if cell["cell_type"] != "code":
            continue
        checked = "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT")
        assert [o.get("name") for o in cell["outputs"]] == (["stdout"] if checked else [])
        assert cell["execution_count"] == (3 if checked else None)
        kept += checked
    assert kept >= 1


def test_bad_metadata(tmp_path, monkeypatch):
    shutil.copy(labs.get("online-softmax").notebook, tmp_path / "x.ipynb")
    nb = json.loads((tmp_path / "x.ipynb").read_text())
    del nb["metadata"]["kclub"]["title"]
    (tmp_path / "x.ipynb").write_text(json.dumps(nb))
    monkeypatch.setattr(labs, "LABS", tmp_path)
    with pytest.raises(ValueError, match="kclub.title"):
        labs.discover()


def test_a_notebook_that_is_not_a_lab_is_left_out(tmp_path, monkeypatch, capsys):
    """A reader's Untitled.ipynb in labs/ breaks neither the catalog nor `kclub list`, and the
    labs' conftest keeps nbval from collecting it."""
    shutil.copy(labs.get("online-softmax").notebook, tmp_path / "online-softmax.ipynb")
    (tmp_path / "Untitled.ipynb").write_text(json.dumps(
        {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    monkeypatch.setattr(labs, "LABS", tmp_path)
    assert list(labs.discover()) == ["online-softmax"]
    assert [p.name for p in labs.strays()] == ["Untitled.ipynb"]
    assert cli.main(["list"]) == 0
    assert "Untitled.ipynb is not a lab" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("labs_conftest", ROOT / "labs" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    assert conftest.pytest_ignore_collect(tmp_path / "Untitled.ipynb", None) is True
    assert conftest.pytest_ignore_collect(tmp_path / "online-softmax.ipynb", None) is None


def test_help_does_not_import_torch():
    """`kclub --help` answers at once: no torch, triton, jax or kernels behind it."""
    code = ("import sys\nfrom shared import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'triton', 'jax', 'kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
