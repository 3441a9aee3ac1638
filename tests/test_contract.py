"""The lab contract (docs/lab-contract.md), checked statically: catalog, cards, notebooks as
committed."""

import json
import re
import subprocess

import pytest

from shared import labs
from shared.paths import LABS, PAPERS, ROOT

LABS_FOUND = labs.discover()
CATALOG_ROW = re.compile(r"^\|\s*\[([\w-]+)\]\(labs/([\w-]+)\.ipynb\)")


def _catalog() -> dict[str, str]:
    """README's lab catalog: slug -> the whole row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Lab catalog", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = CATALOG_ROW.match(line)
        if m:
            assert m.group(1) == m.group(2), f"catalog row links the wrong notebook: {line}"
            rows[m.group(1)] = line
    return rows


def test_there_are_labs():
    assert "online-softmax" in LABS_FOUND


def test_catalog_and_notebooks_match():
    catalog = _catalog()
    assert set(LABS_FOUND) <= set(catalog), "every lab notebook needs a README catalog row"
    listed = {slug for slug, row in catalog.items() if not row.rstrip().endswith("| planned |")}
    assert listed <= set(LABS_FOUND), "catalog rows (unless 'planned') need their notebook"


def test_cards_and_labs_match():
    cards = {p.stem for p in PAPERS.glob("*.md")} - {"README"}
    used = {stem for lab in LABS_FOUND.values() for stem in lab.papers}
    assert used <= cards, f"labs name missing cards: {sorted(used - cards)}"
    assert cards <= used, f"cards no lab names: {sorted(cards - used)}"


@pytest.mark.parametrize("slug", sorted(LABS_FOUND))
def test_card_has_the_sections(slug):
    for card in LABS_FOUND[slug].cards():
        text = card.read_text()
        assert "arxiv.org" in text.lower() or "doi" in text.lower(), f"{card.name}: no link"
        for heading in ("## Claims", "## What the lab reproduces", "## Discussion"):
            assert heading in text, f"{card.name}: missing '{heading}'"


def committed_text(path) -> str:
    """The notebook as committed (HEAD), so a lab run and saved in JupyterLab, outputs and all,
    leaves the contract passing; a notebook not yet committed is read from the working tree."""
    rel = path.relative_to(ROOT).as_posix()
    shown = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True,
                           text=True)
    return shown.stdout if shown.returncode == 0 else path.read_text()


@pytest.mark.parametrize("slug", sorted(LABS_FOUND))
def test_notebook_as_committed(slug):
    path = LABS / f"{slug}.ipynb"
    raw = committed_text(path)
    nb = json.loads(raw)
    assert not re.search(r"/(work|home|root|Users|tmp)/", raw), "stored output holds a path"
    assert nb["metadata"]["kernelspec"]["name"] == "kernel-club", \
        "the lab's kernel is the project's kernelspec (make setup installs it), not python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    imports = re.findall(r"^\s*(?:import|from)\s+([\w.]+)", "".join(code[0]["source"]), re.M)
    assert "kernels" in imports and set(imports[:imports.index("kernels")]) <= {"os"}, \
        "the first code cell must `import kernels` before anything but os (it picks the " \
        "Triton interpreter before triton loads)"
    assert any(re.search(r"\bassert\b|assert_close", "".join(c["source"])) for c in code)
    for cell in code:
        source = "".join(cell["source"])
        checked = source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")
        assert checked or not cell["outputs"], "commit notebooks without outputs (kclub strip)"
        assert all(o["output_type"] != "error" for o in cell["outputs"])
        assert "XLA_FLAGS" not in source or source.lstrip().startswith(("import os", "#")), \
            "XLA_FLAGS must be set before jax is imported"
    assert any("papers/" in "".join(c["source"]) for c in nb["cells"]
               if c["cell_type"] == "markdown"), "the lab must link its paper card"
