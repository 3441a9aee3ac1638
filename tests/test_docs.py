"""The repository's references hold: every `.md` path a tracked file mentions exists in the
repository, and kernels/ never imports shared/ (docs/architecture.md, "Arrows point one way").

A mention is a markdown link target (`[text](<file>.md#<part>)`) or a bare path such as
`docs/claims.md` in prose: a text file's lines, a notebook's markdown cells and code comments, a
Python file's comments and docstrings. String literals in code are left out: they name files a
program writes (the site's pages, the GPU check's report), not files the repository holds.
A mention resolves against the mentioning file's folder or the repository root. URLs and
templated names (`<slug>.md`, `{stem}.md`, `*.md`) are not mentions of a file."""

import ast
import io
import json
import re
import subprocess
import sys
import tokenize

import pytest

from shared.paths import ROOT

# A path ending in .md, not preceded by a character that would make it part of a longer token:
# a URL, a placeholder (`<stem>.md`, `{stem}.md`), a glob (`*.md`) or a format string.
MD_PATH = re.compile(r"(?<![\w./<>*{}$%~@:+-])((?:\.{1,2}/)*[\w][\w./-]*\.md)\b(?![\w-])")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
# Names mentioned in prose that are not this repository's files, each with the reason.
NOT_OURS = {
    "report.md": "what scripts/gpu_check.py writes into its --out folder",
    "PERFORMANCE.md": "nccl-tests' doc/PERFORMANCE.md, in NVIDIA's repository",
}


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def md_mentions(text: str) -> list[str]:
    """The .md paths `text` mentions, URLs left out."""
    return MD_PATH.findall(URL.sub(" ", text))


def resolves(mention: str, source: str, files: set[str]) -> bool:
    """Whether `mention` in the file `source` names a file in `files` (repository-relative
    paths), read relative to `source`'s folder or to the repository root."""
    folder = (ROOT / source).parent
    for base in (folder, ROOT):
        try:
            rel = (base / mention).resolve().relative_to(ROOT.resolve()).as_posix()
        except ValueError:  # outside the repository
            continue
        if rel in files:
            return True
    return False


def python_prose(source: str) -> list[tuple[int, str]]:
    """(line number, text) of a Python source's comments and docstrings."""
    lines = source.splitlines()
    out = [(tok.start[0], tok.string) for tok in
           tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) \
                and ast.get_docstring(node, clean=False) is not None:
            doc = node.body[0]
            out += [(n, lines[n - 1]) for n in range(doc.lineno, doc.end_lineno + 1)]
    return sorted(out)


def prose(path: str, text: str) -> list[tuple[str, str]]:
    """(where, text) pairs of the parts of a file that are read as prose."""
    if path.endswith(".py"):
        return [(f"{path}:{n}", t) for n, t in python_prose(text)]
    if path.endswith(".ipynb"):
        out = []
        for i, cell in enumerate(json.loads(text)["cells"]):
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                out.append((f"{path} cell {i}", source))
            elif cell["cell_type"] == "code":  # comments only; magics (%, !) are not Python
                out += [(f"{path} cell {i}", line) for line in source.splitlines()
                        if line.lstrip().startswith("#")]
        return out
    return [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1)]


def broken_references(files: list[str]) -> list[str]:
    known = set(files)
    broken = []
    for source in files:
        try:
            text = (ROOT / source).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (figures, checkpoints), or deleted in the working tree
        for where, part in prose(source, text):
            for mention in dict.fromkeys(md_mentions(part)):  # once per place, in order
                if mention.rsplit("/", 1)[-1] in NOT_OURS:
                    continue
                if not resolves(mention, source, known):
                    broken.append(f"{where}: {mention}")
    return list(dict.fromkeys(broken))


def test_every_md_reference_exists():
    broken = broken_references(tracked())
    assert not broken, "references to .md files the repository lacks:\n" + "\n".join(broken)


@pytest.mark.parametrize("text, found", [
    ("see DESIGN.md, 'Measuring honestly'", ["DESIGN.md"]),
    ("[card](../papers/nowhere.md#claims)", ["../papers/nowhere.md"]),
    ("(`docs/claims.md`)", ["docs/claims.md"]),
    ("https://example.org/x.md and <slug>.md and {stem}.md and *.md", []),
    ("ok.mdx is not one; f\"{name}.md\" neither", []),
])
def test_what_counts_as_a_mention(text, found):
    assert md_mentions(text) == found


def test_the_check_can_fail(tmp_path, monkeypatch):
    """Mentions of missing notes are reported with their place, in prose of every kind; existing
    ones, relative to the file or to the root, are not, and neither are string literals."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "[b](b.md) and [root](../README.md) and docs/b.md\nbut GONE.md is not here\n")
    (tmp_path / "docs" / "b.md").write_text("")
    (tmp_path / "README.md").write_text("see docs/a.md and docs/missing.md\n")
    (tmp_path / "m.py").write_text('"""Docs: docs/b.md and LOST.md."""\n\n'
                                   'OUT = "written.md"  # see docs/nope.md\n')
    (tmp_path / "lab.ipynb").write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["[card](docs/b.md), [old](docs/old.md)"]},
        {"cell_type": "code", "source": ["x = 'made.md'\n", "# as in NOTES.md\n"]}]}))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    files = ["docs/a.md", "docs/b.md", "README.md", "m.py", "lab.ipynb"]
    assert broken_references(files) == [
        "docs/a.md:2: GONE.md", "README.md:1: docs/missing.md", "m.py:1: LOST.md",
        "m.py:3: docs/nope.md", "lab.ipynb cell 0: docs/old.md", "lab.ipynb cell 1: NOTES.md"]


def test_kernels_never_import_shared():
    """The one-way arrows labs -> shared -> kernels: a kernel module imports no `shared`."""
    offenders = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n == "shared" or n.startswith("shared.")]
    assert not offenders, "kernels/ imports shared/:\n" + "\n".join(offenders)
