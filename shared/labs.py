"""The lab catalog is the notebooks themselves: labs/<slug>.ipynb with metadata

    {"kclub": {"title": "...", "papers": ["<card stem in papers/>", ...], "bench": "module"|null}}
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


def discover() -> dict[str, Lab]:
    """Every lab notebook, by slug; a notebook without kclub metadata is an error."""
    labs = {}
    for path in sorted(LABS.glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("kclub")
        if not meta or not meta.get("title") or not meta.get("papers"):
            raise ValueError(f"{path.name}: notebook metadata needs kclub.title and kclub.papers")
        labs[path.stem] = Lab(path.stem, meta["title"], tuple(meta["papers"]), meta.get("bench"),
                              path)
    return labs


def get(slug: str) -> Lab:
    """The lab called `slug`; an unknown slug names the valid ones."""
    labs = discover()
    if slug not in labs:
        raise KeyError(f"no lab {slug!r}; labs: {', '.join(labs) or '(none)'}")
    return labs[slug]
