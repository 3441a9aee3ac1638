"""Where things live: the repository's folders and build/ (KC_BUILD overrides it)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "labs"
PAPERS = ROOT / "papers"


def build_dir() -> Path:
    """build/, or $KC_BUILD; read each call so `kclub run` can point a lab elsewhere."""
    return Path(os.environ.get("KC_BUILD", ROOT / "build"))


def lab_build_dir(slug: str) -> Path:
    path = build_dir() / slug
    path.mkdir(parents=True, exist_ok=True)
    return path
