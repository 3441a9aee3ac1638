"""One look for every lab's figures, and where they are saved (build/<slug>/<name>.png)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from shared.paths import lab_build_dir

STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 90,
    "savefig.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "legend.frameon": False,
}
matplotlib.rcParams.update(STYLE)


def savefig(fig, lab: str, name: str) -> Path:
    """Save `fig` as build/<lab>/<name>.png and return the path (the notebook shows it too)."""
    path = lab_build_dir(lab) / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    return path
