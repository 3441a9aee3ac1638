"""shared/claims.py and `kclub claims`: verdicts need a criterion, info rows do not count, runs
are written atomically and promoted only when complete, bad files are skipped with a message;
and every lab's verdict claims state their criterion (checked on the committed notebooks)."""

import ast
import json

import pytest

from shared import bench, claims, cli, labs
from shared.claims import (
    Above,
    AtLeast,
    AtMost,
    Below,
    Between,
    Equals,
    IntervalAbove,
    IntervalBelow,
    Within,
)

RATIO = bench.ratio([2.0, 2.1, 1.9, 2.05, 1.95], [1.0, 1.0, 1.0, 1.0, 1.0])


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("KC_BUILD", str(tmp_path))
    return tmp_path / "claims"


@pytest.mark.parametrize("criterion, yes, no, text", [
    (Above(1.0), 1.01, 1.0, "> 1"),
    (AtLeast(2), 2.0, 1.99, ">= 2"),
    (Below(1e-5), 9e-6, 1e-5, "< 1e-05"),
    (AtMost(0.5), 0.5, 0.51, "<= 0.5"),
    (Equals(4), 4.0, 4.000001, "= 4 exactly"),
    (Between(1.6, 2.05), 2.05, 1.59, "in [1.6, 2.05]"),
    (Within(1.3, rel=0.1), 1.42, 1.44, "within 10% of 1.3"),
    (Within(0, abs=0.05), -0.05, 0.06, "within ±0.05 of 0"),
    (AtLeast(2, label="the paper's low end"), 3, 1, ">= 2 (the paper's low end)"),
])
def test_point_criteria(criterion, yes, no, text):
    assert criterion.holds(yes) is True and criterion.holds(no) is False
    assert criterion.text == text
    with pytest.raises(TypeError, match="interval"):
        criterion.holds(RATIO)


def test_interval_criteria():
    assert RATIO.low > 1.5 and RATIO.high < 2.5
    assert IntervalAbove(1.0).holds(RATIO) and not IntervalAbove(2.0).holds(RATIO)
    assert IntervalBelow(2.5).holds(RATIO) and not IntervalBelow(2.0).holds(RATIO)
    assert "95% confidence" in IntervalAbove().text
    with pytest.raises(TypeError, match="bench.Ratio"):
        IntervalAbove(1.0).holds(2.0)


@pytest.mark.parametrize("make, match", [
    (lambda: Within(1.0), "exactly one"), (lambda: Within(1.0, rel=0.1, abs=0.1), "exactly one"),
    (lambda: Within(1.0, rel=-1), ">= 0"), (lambda: Between(2, 1), "low <= high"),
])
def test_bad_criteria(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_verdicts_and_info(build):
    rec = claims.Recorder("demo")
    a = rec.check("accesses", 3, Equals(3), unit="per element", paper=3, method="iocount")
    b = rec.check("speed-up", RATIO, IntervalAbove(2.0), unit="x", method="wall clock")
    c = rec.info("predicted speed-up", 1.33, unit="x", method="roofline", paper=1.3)
    assert (a.kind, a.holds, a.criterion) == ("verdict", True, "= 3 exactly")
    assert b.holds is False and (b.low, b.high) == (RATIO.low, RATIO.high)
    assert b.measured == RATIO.median
    assert (c.kind, c.holds, c.criterion) == ("info", None, "")
    assert claims.tally(rec.claims.values()) == (1, 2)
    assert a.run == rec.run and a.load >= 0 and a.when and a.scale and a.hardware
    with pytest.raises(ValueError, match="already recorded"):
        rec.info("accesses", 3, unit="", method="again")
    for missing in (None, "within 10%", True):
        with pytest.raises(TypeError, match="criterion must be a claims criterion"):
            rec.check("x", 1.0, missing, unit="", method="m")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'criterion'"):
        rec.check("x", 1.0, unit="", method="m")
    with pytest.raises(ValueError, match="NaN"):
        rec.check("x", float("nan"), Above(0), unit="", method="m")
    with pytest.raises(ValueError, match="method"):
        rec.info("x", 1.0, unit="", method="")
    with pytest.raises(ValueError, match="lab"):
        claims.Recorder("a/b")
    assert "x" not in rec.claims


def test_last_complete_run_stays_until_a_new_one_completes(build, capsys):
    first = claims.Recorder("demo")
    first.check("a", 1.0, Above(0), unit="", method="m")
    assert claims.load("demo") == []           # nothing complete yet
    assert (build / "demo.json").exists() is False
    first.finish()
    assert [c.name for c in claims.load("demo")] == ["a"]
    with pytest.raises(ValueError, match="finished"):
        first.info("late", 1.0, unit="", method="m")

    second = claims.Recorder("demo")           # re-running the first cell in JupyterLab
    second.check("b", 0.0, Above(0), unit="", method="m")
    assert [c.name for c in claims.load("demo")] == ["a"]   # the complete table stays
    assert claims.latest("demo").run == second.run and not claims.latest("demo").complete
    assert cli.main(["claims"]) == 0
    out = capsys.readouterr().out
    assert f"a newer run {second.run}" in out and f"the table shows run {first.run}" in out
    assert "| a |" in out and "| b |" not in out and "1/1 verdict claims hold" in out

    second.finish()
    assert [c.name for c in claims.load("demo")] == ["b"]
    assert sorted(p.name for p in build.iterdir()) == ["demo.json"]   # no temp files left


def test_a_failed_write_leaves_the_old_file(build, monkeypatch):
    rec = claims.Recorder("demo")
    rec.check("a", 1.0, Above(0), unit="", method="m")
    before = (build / "demo.running.json").read_text()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(claims.json, "dump", broken)
    with pytest.raises(OSError, match="disk full"):
        rec.check("b", 1.0, Above(0), unit="", method="m")
    assert (build / "demo.running.json").read_text() == before
    assert [p.name for p in build.iterdir()] == ["demo.running.json"]


def test_corrupt_and_old_files_are_skipped(build, capsys):
    rec = claims.Recorder("good")
    rec.check("a", 2.0, Above(1), unit="x", method="m")
    rec.finish()
    (build / "old.json").write_text(json.dumps([{"lab": "old", "name": "x", "holds": True}]))
    (build / "torn.json").write_text('{"schema": 2, "lab": "torn", "cl')
    (build / "alien.json").write_text(json.dumps({"schema": 2, "lab": "alien", "run": "r",
                                                  "started": "", "finished": "",
                                                  "claims": [{"name": "x"}]}))
    assert cli.main(["claims"]) == 0
    out, err = capsys.readouterr()
    assert "1/1 verdict claims hold across 1 labs" in out
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("claims: skipping ") for line in lines)
    assert "old.json" in err and "older version" in err and "torn.json" in err
    assert "alien.json" in err and "fields" in err


def test_table_groups_by_lab_and_shows_everything(build):
    for lab, ok in (("lab-b", True), ("lab-a", False)):
        rec = claims.Recorder(lab)
        rec.check("timed", RATIO, IntervalAbove(1.0 if ok else 3.0), unit="x", method="compare",
                  note="" if ok else "slower on this CPU: see the lab")
        rec.info("predicted", 4 / 3, unit="x", method="roofline", hardware="H100 SXM")
        rec.finish()
    text = claims.report(claims.load_runs())
    assert text.index("### lab-a: 0/1") < text.index("### lab-b: 1/1")
    for col in claims.COLUMNS:
        assert col in text
    assert f"[{RATIO.low:.4g}, {RATIO.high:.4g}]" in text and "| NO |" in text
    assert "| info |" in text and "slower on this CPU" in text and "H100 SXM" in text
    assert "1/2 verdict claims hold across 2 labs" in text


def test_json_is_the_same_data(build, capsys):
    rec = claims.Recorder("demo")
    rec.check("timed", RATIO, IntervalAbove(1.0), unit="x", method="compare")
    rec.info("predicted", 1.33, unit="x", method="roofline")
    rec.finish()
    claims.Recorder("demo").info("partial", 1.0, unit="", method="m")
    assert cli.main(["claims", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["hold"], data["verdicts"]) == (1, 1)
    done, running = data["runs"]
    assert done["complete"] and not running["complete"] and running["claims"][0]["name"] == \
        "partial"
    assert done["claims"][0]["low"] == RATIO.low and done["claims"][1]["kind"] == "info"


# The lab contract: every verdict a lab records states its criterion.

def record_call_problems(source: str) -> list[str]:
    """Calls on a claims.Recorder in one notebook's code that break the contract."""
    tree = ast.parse(source)
    recorders = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Call)
                 and ast.unparse(node.value.func).endswith("Recorder")
                 for t in node.targets if isinstance(t, ast.Name)}
    problems = [] if recorders else ["no claims.Recorder"]
    finished = False
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in recorders):
            continue
        call, kw = ast.unparse(node)[:60], {k.arg for k in node.keywords}
        if node.func.attr == "check":
            crit = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "criterion"), None)
            if crit is None or (isinstance(crit, ast.Constant)):
                problems.append(f"verdict without a criterion: {call}")
        elif node.func.attr == "info":
            if kw & {"criterion", "holds"}:
                problems.append(f"info row with a verdict: {call}")
        elif node.func.attr == "finish":
            finished = True
        elif node.func.attr != "claims":
            problems.append(f"not a Recorder method (old API?): {call}")
    if recorders and not finished:
        problems.append("the run is never finished (rec.finish() in the last cell)")
    return problems


def notebook_code(slug: str) -> str:
    nb = json.loads(labs.get(slug).notebook.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    return "\n".join(line for c in cells for line in c.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


@pytest.mark.parametrize("slug", sorted(labs.discover()))
def test_every_lab_verdict_states_its_criterion(slug):
    assert record_call_problems(notebook_code(slug)) == []


def test_the_contract_check_can_fail():
    good = ("rec = claims.Recorder(LAB)\nrec.check('a', 1, Above(0), unit='', method='m')\n"
            "rec.info('b', 2, unit='', method='m')\nrec.finish()\n")
    assert record_call_problems(good) == []
    bad = {"rec.check('c', 1, unit='', method='m')": "without a criterion",
           "rec.check('c', 1, criterion=None, unit='', method='m')": "without a criterion",
           "rec.info('c', 1, holds=True, unit='', method='m')": "info row with a verdict",
           "rec.record('c', 1, holds=True, unit='', method='m')": "old API"}
    for line, why in bad.items():
        assert why in " ".join(record_call_problems(good + line)), line
    assert "never finished" in " ".join(record_call_problems(good.replace("rec.finish()", "")))
