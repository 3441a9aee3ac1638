"""The lab catalog is the notebooks themselves: labs/<slug>.ipynb with metadata

    {"kclub": {"title": "...", "papers": ["<card stem in papers/>", ...], "bench": "module"|null}}

A notebook with no "kclub" key (a reader's Untitled.ipynb) is not a lab: the catalog leaves it
out and `strays()` names it, so `kclub list`, the contract test and nbval pass it by. A notebook
that has the key but not its fields is a broken lab, and an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.paths import LABS, PAPERS


@dataclass(frozen=True)
class Lab:
    slug: str
    title: str
    papers: tuple[str, ...]
    bench: str | None
    notebook: Path

    def cards(self) -> list[Path]:
        return [PAPERS / f"{stem}.md" for stem in self.papers]


def kclub_metadata(path: Path) -> dict | None:
    """The notebook's "kclub" metadata; None when it has none (or is not a notebook at all)."""
    try:
        return json.loads(path.read_text()).get("metadata", {}).get("kclub")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def strays() -> list[Path]:
    """Notebooks in labs/ that are not labs (no kclub metadata)."""
    return [p for p in sorted(LABS.glob("*.ipynb")) if kclub_metadata(p) is None]


def discover() -> dict[str, Lab]:
    """Every lab notebook, by slug (strays left out); a lab whose metadata lacks its title or
    papers is an error."""
    labs = {}
    for path in sorted(LABS.glob("*.ipynb")):
        meta = kclub_metadata(path)
        if meta is None:
            continue
        if not meta.get("title") or not meta.get("papers"):
            raise ValueError(f"{path.name}: notebook metadata needs kclub.title and kclub.papers")
        labs[path.stem] = Lab(path.stem, meta["title"], tuple(meta["papers"]), meta.get("bench"),
                              path)
    return labs


class UnknownLab(LookupError):
    """No lab has this slug (its own type, so that a KeyError raised inside a lab's code or
    benchmark is never reported as an unknown slug)."""


def get(slug: str) -> Lab:
    """The lab called `slug`; an unknown slug names the valid ones."""
    labs = discover()
    if slug not in labs:
        raise UnknownLab(f"no lab {slug!r}; labs: {', '.join(labs) or '(none)'}")
    return labs[slug]
