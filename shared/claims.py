"""The scoreboard: every claim a lab makes, with the bar it must clear, or shown as info.

Two kinds of row (docs/claims.md, "Verdicts and info"):
- a verdict: `rec.check(name, measured, AtLeast(2.0), ...)`. The criterion is data: it computes
  the verdict and states itself in the table. Timing ratios (`bench.ratio`) carry a bootstrap
  interval, and their criteria (`IntervalAbove`, `IntervalBelow`) read the interval.
- info: `rec.info(name, value, ...)`: a prediction, or a number with no bar. No verdict; it
  does not count in "N/M hold".

Records: `Recorder(lab)` starts a run, written (atomically, after every claim) to
build/claims/<lab>.running.json; `rec.finish()` in the lab's last cell promotes it to
build/claims/<lab>.json. So a lab's last complete scoreboard stays until a new run of it
completes: running one cell in JupyterLab, or a run that fails half way, does not wipe it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from shared.bench import Ratio
from shared.criteria import (  # noqa: F401  (re-exported: labs write claims.AtLeast(...))
    Above,
    AtLeast,
    AtMost,
    Below,
    Between,
    Criterion,
    Equals,
    IntervalAbove,
    IntervalBelow,
    Within,
    format_number,
)
from shared.device import hardware_name, scale
from shared.paths import build_dir

SCHEMA = 2
RUNNING = ".running"   # build/claims/<lab>.running.json: a run in progress (or one that died)


@dataclass(frozen=True)
class Claim:
    lab: str
    name: str
    kind: str                 # "verdict" or "info"
    measured: float
    unit: str
    method: str
    paper: float | None
    predicted: float | None
    low: float | None         # the 95% interval of a timing ratio
    high: float | None
    criterion: str            # "" for info rows
    holds: bool | None        # None for info rows
    note: str
    scale: str
    hardware: str
    load: float               # 1-minute load average when recorded
    when: str
    run: str


@dataclass(frozen=True)
class Run:
    lab: str
    run: str
    started: str
    finished: str | None      # None: in progress, or stopped before rec.finish()
    claims: tuple[Claim, ...]

    @property
    def complete(self) -> bool:
        return self.finished is not None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _claims_dir() -> Path:
    return build_dir() / "claims"


def _write_atomic(path: Path, payload: dict) -> None:
    """Temp file in the same folder, then os.replace: a reader sees the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Recorder:
    """One run of one lab's claims. Call `finish()` in the lab's last cell."""

    def __init__(self, lab: str):
        if not isinstance(lab, str) or not re.fullmatch(r"[\w-]+", lab):
            raise ValueError(f"lab must be a lab slug (letters, digits, -), got {lab!r}")
        self.lab = lab
        self.run = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        self.started = _now()
        self.finished: str | None = None
        self.claims: dict[str, Claim] = {}
        self._save()

    def check(self, name: str, measured: float | Ratio, criterion: Criterion, *, unit: str,
              method: str, paper: float | None = None, predicted: float | None = None,
              hardware: str | None = None, note: str = "") -> Claim:
        """A verdict claim: `criterion` (Within, AtLeast, IntervalAbove, ...) decides."""
        if not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a claims criterion (Within, AtLeast, Below, "
                            f"IntervalAbove, ...) for verdict claim {name!r}, got {criterion!r}; "
                            "a number with no bar is rec.info")
        holds = criterion.holds(measured)
        return self._add(name, "verdict", measured, unit, method, paper, predicted, hardware,
                         note, criterion.text, holds)

    def info(self, name: str, value: float | Ratio, *, unit: str, method: str,
             paper: float | None = None, predicted: float | None = None,
             hardware: str | None = None, note: str = "") -> Claim:
        """A number shown with no verdict: a prediction, or a measurement with no bar."""
        return self._add(name, "info", value, unit, method, paper, predicted, hardware, note,
                         "", None)

    def finish(self) -> Path:
        """The run is complete: it replaces the lab's last complete scoreboard."""
        self._open()
        self.finished = _now()
        self._save()
        done = _claims_dir() / f"{self.lab}.json"
        os.replace(self._running_path(), done)
        return done

    def _open(self) -> None:
        if self.finished:
            raise ValueError(f"run {self.run} of {self.lab} has finished; start a new run "
                             "with claims.Recorder (the lab's first cell)")

    def _add(self, name, kind, measured, unit, method, paper, predicted, hardware, note,
             criterion, holds) -> Claim:
        self._open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self.claims:
            raise ValueError(f"claim {name!r} is already recorded in run {self.run} of "
                             f"{self.lab}: names are unique per run (re-running a cell? start a "
                             "new run from the lab's first cell)")
        if not method:
            raise ValueError(f"method must say how {name!r} was obtained")
        low = high = None
        if isinstance(measured, Ratio):
            measured, low, high = measured.median, measured.low, measured.high
        measured = float(measured)
        if math.isnan(measured):
            raise ValueError(f"measured is NaN for claim {name!r}")
        opt = lambda x: None if x is None else float(x)
        claim = Claim(self.lab, name, kind, measured, unit, method, opt(paper), opt(predicted),
                      low, high, criterion, holds, note, scale(), hardware or hardware_name(),
                      round(os.getloadavg()[0], 2), _now(), self.run)
        self.claims[name] = claim
        self._save()
        return claim

    def _running_path(self) -> Path:
        return _claims_dir() / f"{self.lab}{RUNNING}.json"

    def _save(self) -> None:
        _write_atomic(self._running_path(),
                      {"schema": SCHEMA, "lab": self.lab, "run": self.run,
                       "started": self.started, "finished": self.finished,
                       "claims": [asdict(c) for c in self.claims.values()]})


def _read(path: Path) -> Run:
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        got = payload.get("schema") if isinstance(payload, dict) else "none (a bare list)"
        raise ValueError(f"schema {got}, expected {SCHEMA}: written by an older version")
    names = {f.name for f in fields(Claim)}
    rows = payload["claims"]
    if not all(isinstance(r, dict) and set(r) == names for r in rows):
        raise ValueError("claim rows do not match this version's fields")
    return Run(payload["lab"], payload["run"], payload["started"], payload["finished"],
               tuple(Claim(**r) for r in rows))


def load_runs(lab: str | None = None) -> list[Run]:
    """Every lab's last complete run and any run in progress, sorted by lab; a file that is
    corrupt or from an older schema is reported in one line on stderr and skipped."""
    d = _claims_dir()
    paths = ([d / f"{lab}.json", d / f"{lab}{RUNNING}.json"] if lab
             else sorted(d.glob("*.json")))
    runs = []
    for p in paths:
        if not p.exists():
            continue
        try:
            runs.append(_read(p))
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            print(f"claims: skipping {p}: {type(e).__name__}: {e}", file=sys.stderr)
    # A running file is always the lab's newest run: each Recorder overwrites it, finish moves it.
    return sorted(runs, key=lambda r: (r.lab, not r.complete))


def load(lab: str | None = None) -> list[Claim]:
    """The claims of each lab's last complete run."""
    return [c for r in load_runs(lab) if r.complete for c in r.claims]


def latest(lab: str) -> Run | None:
    """The lab's newest run, complete or not (what `kclub run` just did)."""
    runs = load_runs(lab)
    return runs[-1] if runs else None


def tally(claims: Iterable[Claim]) -> tuple[int, int]:
    """(verdict claims that hold, verdict claims): info rows do not count."""
    verdicts = [c for c in claims if c.kind == "verdict"]
    return sum(bool(c.holds) for c in verdicts), len(verdicts)


def _fmt(x: float | None) -> str:
    return "—" if x is None else format_number(x)


COLUMNS = ["claim", "measured", "95% interval", "unit", "paper", "predicted", "criterion",
           "verdict", "method", "notes", "when", "scale", "hardware", "load"]


def table(claims: Iterable[Claim]) -> str:
    """Markdown: one section per lab, its hold count in the heading, one row per claim."""
    by_lab: dict[str, list[Claim]] = {}
    for c in claims:
        by_lab.setdefault(c.lab, []).append(c)
    out = []
    for lab, rows in by_lab.items():
        held, n = tally(rows)
        out += [f"### {lab}: {held}/{n} verdict claims hold, {len(rows) - n} info "
                f"(run {rows[0].run})", "",
                "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for c in rows:
            interval = ("—" if c.low is None
                        else f"[{format_number(c.low)}, {format_number(c.high)}]")
            verdict = "info" if c.kind == "info" else ("yes" if c.holds else "NO")
            cells = [c.name, _fmt(c.measured), interval, c.unit, _fmt(c.paper),
                     _fmt(c.predicted), c.criterion or "—", verdict, c.method, c.note or "—",
                     c.when, c.scale, c.hardware, f"{c.load:.2f}"]
            out.append("| " + " | ".join(s.replace("|", "/") for s in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def report(runs: list[Run]) -> str:
    """`kclub claims`: the complete runs' table, a line per newer unfinished run, the total."""
    complete = [r for r in runs if r.complete]
    lines = [table(c for r in complete for c in r.claims)] if complete else []
    done = {r.lab: r for r in complete}
    for r in runs:
        if not r.complete:
            shown = (f"the table shows run {done[r.lab].run}, finished {done[r.lab].finished}"
                     if r.lab in done else "no complete run to show")
            lines.append(f"{r.lab}: a newer run {r.run} (started {r.started}) is in progress "
                         f"or stopped early with {len(r.claims)} claims; {shown}")
    held, n = tally(c for r in complete for c in r.claims)
    lines.append(f"\n{held}/{n} verdict claims hold across {len(done)} labs' last complete runs")
    return "\n".join(lines)


def as_json(runs: list[Run]) -> dict:
    """`kclub claims --json`: the same runs and totals as data."""
    held, n = tally(c for r in runs if r.complete for c in r.claims)
    return {"schema": SCHEMA, "hold": held, "verdicts": n,
            "runs": [{**{k: v for k, v in asdict(r).items() if k != "claims"},
                      "complete": r.complete, "hold": tally(r.claims)[0],
                      "verdicts": tally(r.claims)[1], "claims": [asdict(c) for c in r.claims]}
                     for r in runs]}
