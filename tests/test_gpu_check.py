"""scripts/gpu_check.py on this CPU (--dry-run): the report is written, well-formed, and says
when it is partial, whatever the budget."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from shared.benchmarks.report import write_report

ROOT = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "failed", "timeout", "not run"}


def gpu_check(out: Path, *args: str, timeout: float) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert (out / "report.json").exists(), proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())   # strict JSON: no NaN
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU check (dry-run")
    assert {"complete", "partial", "environment", "tests", "bench", "elapsed_s"} <= set(report)
    assert report["elapsed_s"] <= report["budget_s"] + 15     # stopped steps, not a hang
    for b in report["bench"]:
        assert b["status"] in STATUSES and f"## {b['lab']}" in md
        assert all(isinstance(r, dict) and r["section"] for r in b["rows"])
    stopped = [b for b in report["bench"] if b["status"] in ("timeout", "not run")]
    assert report["complete"] == (not stopped and report["tests"]["status"] == "ok")
    assert ("PARTIAL" in md) == (not report["complete"])
    return proc.returncode, report, md


def test_no_time_left_still_writes_a_partial_report(tmp_path):
    rc, report, md = gpu_check(tmp_path, "--budget", "9", "--labs", "online-softmax",
                               timeout=120)
    assert rc == 1 and not report["complete"]
    assert report["tests"]["status"] == "not run"
    assert [b["status"] for b in report["bench"]] == ["not run"]
    assert "online-softmax: not run" in report["partial"]


def test_dry_run_runs_tests_and_a_benchmark(tmp_path):
    rc, report, md = gpu_check(tmp_path, "--budget", "70", "--labs", "online-softmax",
                               "--tests", "tests/test_softmax.py", "-k", "bad_input",
                               timeout=200)
    tests = report["tests"]
    assert tests["status"] == "ok" and tests["counts"]["failures"] == 0
    assert tests["counts"]["tests"] >= 10     # the 12 bad-input cases
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert int(next(suite.iter("testsuite")).get("tests")) == tests["counts"]["tests"]
    (bench,) = report["bench"]
    assert bench["rows"], bench      # rows come back even if the step ran out of time
    assert any(r["section"].startswith("accesses per element") for r in bench["rows"])
    assert rc == (0 if report["complete"] else 1)
    assert (tmp_path / "gpu-check.log").read_text().count("=====") == 2


def test_report_turns_non_finite_numbers_into_strings(tmp_path):
    report = {"mode": "dry-run", "complete": True, "partial": [], "started": "now",
              "budget_s": 1.0, "notes": [], "environment": {}, "tests": {},
              "bench": [{"lab": "x", "module": "m", "status": "ok",
                         "rows": [{"section": "s", "ratio": float("inf"), "t": float("nan")}]}]}
    write_report(report, tmp_path)
    row = json.loads((tmp_path / "report.json").read_text())["bench"][0]["rows"][0]
    assert row == {"section": "s", "ratio": "inf", "t": "nan"}
    assert "| inf | nan |" in (tmp_path / "report.md").read_text()
