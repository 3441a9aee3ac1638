"""The scoreboard: every claim a lab measures, beside the paper's number and the model's.

A lab opens a `Recorder` (which clears its previous claims) and records each number it
measures; the claims land in build/claims/<slug>.json, and `kclub claims` prints one table
across all labs from their last runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from shared.device import hardware_name, scale
from shared.paths import build_dir


@dataclass(frozen=True)
class Claim:
    lab: str
    name: str
    measured: float
    unit: str
    paper: float | None
    predicted: float | None
    holds: bool
    method: str
    scale: str
    hardware: str
    note: str = ""
    when: str = ""


def _claims_dir():
    return build_dir() / "claims"


class Recorder:
    """Records one lab's claims; creating it starts the lab's table afresh."""

    def __init__(self, lab: str):
        if not lab or "/" in lab:
            raise ValueError(f"lab must be a lab slug, got {lab!r}")
        self.lab = lab
        self.path = _claims_dir() / f"{lab}.json"
        self.claims: dict[str, Claim] = {}
        self._save()

    def record(self, name: str, measured: float, *, unit: str, holds: bool, method: str,
               paper: float | None = None, predicted: float | None = None,
               hardware: str | None = None, note: str = "") -> Claim:
        """File one measured number. `holds` is the lab's verdict on the claim; `method` says
        how the number was obtained (counted, timed, predicted — and with what)."""
        if not isinstance(holds, (bool, np.bool_)):  # numpy comparisons give np.bool_
            raise TypeError(f"holds must be a bool, got {type(holds).__module__}."
                            f"{type(holds).__name__} {holds!r}")
        holds = bool(holds)
        if not method:
            raise ValueError("method must say how the number was obtained")
        measured = float(measured)
        if math.isnan(measured):
            raise ValueError(f"measured is NaN for claim {name!r}")
        claim = Claim(self.lab, name, measured, unit,
                      None if paper is None else float(paper),
                      None if predicted is None else float(predicted),
                      holds, method, scale(), hardware or hardware_name(), note,
                      datetime.now(UTC).isoformat(timespec="seconds"))
        self.claims[name] = claim
        self._save()
        return claim

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(c) for c in self.claims.values()]
        self.path.write_text(json.dumps(rows, indent=1))


def load(lab: str | None = None) -> list[Claim]:
    """Claims from the last runs: of one lab, or of every lab that has run."""
    d = _claims_dir()
    paths = [d / f"{lab}.json"] if lab else sorted(d.glob("*.json"))
    return [Claim(**row) for p in paths if p.exists() for row in json.loads(p.read_text())]


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}"


def table(claims: list[Claim]) -> str:
    """A Markdown table of claims, for the terminal and for the README."""
    cols = ["lab", "claim", "measured", "predicted", "paper", "unit", "holds", "method",
            "scale, hardware"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in claims:
        rows.append(f"| {c.lab} | {c.name} | {_fmt(c.measured)} | {_fmt(c.predicted)} | "
                    f"{_fmt(c.paper)} | {c.unit} | {'yes' if c.holds else 'NO'} | {c.method} | "
                    f"{c.scale}, {c.hardware} |")
    return "\n".join(rows)
