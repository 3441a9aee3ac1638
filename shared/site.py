"""`make site` (python -m shared.site): a static site of the executed labs, with the claims
table, the paper cards, the project's docs and the GPU reports. Sphinx with MyST-NB; nothing is
executed at build time: a lab page is the notebook executed into build/<slug>/<slug>.ipynb by
`kclub run` or by nbval in `make test` (labs/conftest.py saves it), so its outputs and figures
are the ones that run made (`--run` executes the labs that lack a current one).

The source tree mirrors the repository (labs/, papers/, docs/), so the labs' relative links to
../papers/ and ../docs/ resolve as they do on GitHub. Links to code files (../shared/x.py) point
at the repository, which the site does not contain: they are rewritten to plain text naming
the path. After the build, `check` reads the HTML: every local link and image must resolve, and
every lab page must carry at least as many images as its executed notebook has figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared import labs
from shared.paths import ROOT, build_dir

DOC_SUFFIXES = (".md", ".ipynb")
CONF = '''project = "Kernel Club"
extensions = ["myst_nb"]
nb_execution_mode = "off"            # pages show the outputs `kclub run` produced
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
myst_heading_slug_func = "shared.site.github_slug"   # the anchors GitHub makes: links agree
suppress_warnings = ["myst.header", "misc.highlighting_failure"]
html_title = "Kernel Club"
exclude_patterns = ["_build"]
'''
CODE_LINK = re.compile(r"\[([^\]]+)\]\((?!https?:|#|mailto:)([^)\s]+)\)")


def github_slug(title: str) -> str:
    """A heading's anchor as GitHub renders it ("Triton's interpreter" -> tritons-interpreter)."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def executed_notebook(slug: str) -> Path:
    return build_dir() / slug / f"{slug}.ipynb"


def _demote_code_links(text: str, here: Path) -> str:
    """[label](../shared/x.py) -> `label` (../shared/x.py): the site holds no code files."""
    def fix(m: re.Match) -> str:
        target = m.group(2).split("#")[0]
        if not target or target.endswith(DOC_SUFFIXES) or target.endswith((".png", ".svg")):
            return m.group(0)
        return f"{m.group(1)} (`{os.path.normpath(here / target)}` in the repository)"
    return CODE_LINK.sub(fix, text)


def _copy_markdown(src: Path, dst: Path, here: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(_demote_code_links(src.read_text(), here))


def assemble(src: Path) -> dict[str, Path]:
    """Write the Sphinx source tree; return {slug: executed notebook} of the labs it holds.
    A lab with no executed notebook is an error naming the command that makes one."""
    if src.exists():
        shutil.rmtree(src)
    (src / "labs").mkdir(parents=True)
    catalog = labs.discover()
    missing = [s for s in catalog if not executed_notebook(s).exists()]
    if missing:
        raise SystemExit(f"site: no executed notebook for {', '.join(missing)}: run "
                         f"`kclub run <slug>` (or `python -m shared.site --run`) first")
    pages = {}
    for slug in catalog:
        nb = json.loads(executed_notebook(slug).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                source = "".join(cell["source"])
                cell["source"] = _demote_code_links(source, Path("labs"))
        (src / "labs" / f"{slug}.ipynb").write_text(json.dumps(nb))
        pages[slug] = executed_notebook(slug)
    for card in sorted((ROOT / "papers").glob("*.md")):
        _copy_markdown(card, src / "papers" / card.name, Path("papers"))
    for doc in sorted((ROOT / "docs").rglob("*.md")):
        rel = doc.relative_to(ROOT)
        _copy_markdown(doc, src / rel, rel.parent)
    _write_claims(src / "claims.md")
    _write_index(src, catalog)
    (src / "conf.py").write_text(CONF)
    return pages


def _write_claims(path: Path) -> None:
    from shared import claims

    runs = claims.load_runs()
    body = claims.report(runs) if runs else "No lab has recorded claims yet."
    path.write_text("# Claims\n\nEach lab's last complete run (`kclub claims`): a verdict states "
                    "its criterion and can fail; an info row is a number without a bar.\n\n"
                    f"{body}\n")


def _write_index(src: Path, catalog: dict) -> None:
    def toc(caption: str, entries: list[str]) -> str:
        return "\n".join(["```{toctree}", f":caption: {caption}", ":maxdepth: 1", "",
                          *entries, "```", ""])
    docs = sorted(p.relative_to(src).with_suffix("").as_posix()
                  for p in (src / "docs").rglob("*.md"))
    cards = sorted(f"papers/{p.stem}" for p in (src / "papers").glob("*.md"))
    rows = [f"| [{lab.title}](labs/{slug}.ipynb) | {', '.join(lab.papers)} |"
            for slug, lab in catalog.items()]
    (src / "index.md").write_text("\n".join([
        "# Kernel Club", "",
        "Paper reimplementations for a reading group: each lab executed, with its outputs and "
        "figures; the claims it checked; the paper cards.", "",
        "| lab | papers |", "|---|---|", *rows, "",
        toc("Labs", [f"labs/{s}" for s in catalog]), toc("Scoreboard", ["claims"]),
        toc("Papers", cards), toc("Notes", docs)]))


def build(src: Path, out: Path) -> None:
    """sphinx-build with warnings as errors: a broken cross-reference fails the build."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
           str(src), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"site: sphinx-build failed:\n{done.stderr[-4000:]}")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "img" and a.get("src"):
            self.links.append(a["src"])
            self.images += 1


def _figures(notebook: Path) -> int:
    nb = json.loads(notebook.read_text())
    return sum("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
               for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def check(out: Path, pages: dict[str, Path]) -> list[str]:
    """Problems in the built site: local links or images that resolve to nothing, and lab
    pages with fewer images than their executed notebook's figures (or none)."""
    problems = []
    for html in sorted(out.rglob("*.html")):
        refs = _Refs()
        refs.feed(html.read_text(errors="replace"))
        for link in refs.links:
            url = urlparse(link)
            if url.scheme or url.netloc or not url.path or link.startswith("data:"):
                continue
            if not (html.parent / unquote(url.path)).resolve().exists():
                problems.append(f"{html.relative_to(out)}: broken link {link}")
        rel = html.relative_to(out).as_posix()
        slug = rel.removeprefix("labs/").removesuffix(".html")
        if rel.startswith("labs/") and slug in pages:
            want = max(1, _figures(pages[slug]))
            if refs.images < want:
                problems.append(f"{rel}: {refs.images} images, the executed lab has {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build the static site of the executed labs")
    ap.add_argument("--out", type=Path, default=None, help="default: build/site")
    ap.add_argument("--run", action="store_true",
                    help="first execute (kclub run) every lab whose executed notebook is missing "
                         "or older than the lab")
    args = ap.parse_args(argv)
    out = args.out or build_dir() / "site"
    if args.run:
        for slug, lab in labs.discover().items():
            done = executed_notebook(slug)
            if not done.exists() or done.stat().st_mtime < lab.notebook.stat().st_mtime:
                subprocess.run([sys.executable, "-m", "shared.cli", "run", slug], check=True)
    src = build_dir() / "site-src"
    pages = assemble(src)
    build(src, out)
    problems = check(out, pages)
    for p in problems:
        print(f"site: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"site: {len(pages)} labs, {len(list(out.rglob('*.html')))} pages -> "
          f"{out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
