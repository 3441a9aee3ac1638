"""The GPU check's report (scripts/gpu_check.py): report.json, and report.md for people.

Both are rewritten after every step, each through a temporary file and a rename, so a run
stopped at any point leaves a well-formed report that says how far it got.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def write_report(report: dict, out: Path) -> None:
    report = _finite(report)
    _atomic(out / "report.json", json.dumps(report, indent=1, allow_nan=False, default=str))
    _atomic(out / "report.md", markdown(report))


def _finite(x):
    """NaN and ±inf (a ratio over a zero time, say) become strings: strict JSON has neither."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(r: dict) -> str:
    state = "complete" if r["complete"] else "PARTIAL: " + "; ".join(r["partial"])
    lines = [f"# GPU check ({r['mode']})", "",
             f"Started {r['started']}, {r.get('elapsed_s', 0):.0f} s of a {r['budget_s']:.0f} s "
             f"budget. Report: **{state}**.", ""]
    env = r.get("environment", {})
    if env:
        lines += ["## Environment", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in env.items()]
        lines.append("")
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += _tests(r.get("tests", {}))
    for b in r.get("bench", []):
        lines += _bench(b)
    return "\n".join(lines) + "\n"


def _tests(t: dict) -> list[str]:
    if not t:
        return []
    lines = ["## Kernel tests", "", f"Status: {t.get('status')}"
             + (f" in {t['seconds']} s (budget {t['budget_s']} s)" if "seconds" in t else "")
             + f"; files: {', '.join(t.get('files', [])) or 'none'}.", ""]
    for f, missing in t.get("left out", {}).items():
        lines.append(f"- left out {f}: needs {', '.join(missing)}")
    counts = t.get("counts")
    if counts:
        lines += ["", "| tests | failures | errors | skipped |", "| --- | --- | --- | --- |",
                  f"| {counts['tests']} | {counts['failures']} | {counts['errors']} | "
                  f"{counts['skipped']} |", ""]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t.get("failures", [])]
    elif "status" in t and t["status"] not in ("not run", "no test files"):
        lines += ["No JUnit summary (the run was stopped before pytest wrote it). Log tail:",
                  "", "```", t.get("tail", ""), "```"]
    return lines + [""]


def _bench(b: dict) -> list[str]:
    lines = [f"## {b['lab']} (`{b['module']}`)", "",
             f"Status: {b['status']}" + (f" in {b['seconds']} s (budget {b['budget_s']} s)"
                                         if "seconds" in b else "")
             + (f"; {b['note']}" if b.get("note") else "") + ".", ""]
    sections: dict[str, list[dict]] = {}
    for row in b.get("rows", []):
        row = dict(row)
        sections.setdefault(row.pop("section", ""), []).append(row)
    for title, rows in sections.items():
        cols = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"### {title}", "", "| " + " | ".join(cols) + " |",
                  "| " + " | ".join("---" for _ in cols) + " |"]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in rows]
        lines.append("")
    if b["status"] != "ok" and b.get("tail"):
        lines += ["Log tail:", "", "```", b["tail"], "```", ""]
    return lines


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "—"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "none"
    return str(v).replace("|", "\\|").replace("\n", " ")
