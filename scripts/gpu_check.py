"""`make gpu-check OUT=<dir>`: what this project measures on an NVIDIA GPU, in one run.

Runs on the machine's own python3 (its torch, triton and jax) from the repository root with
PYTHONPATH=. — no pip, no venv, no network. One global deadline (default 480 s, inside one
10-minute device call) and a budget per step, so the report is always written: partial,
and marked so, when a step ran out of time.
  1. environment: versions, the GPU, which optional packages are there, and the card's two
     ceilings measured (device-to-device copy GB/s, bf16 matmul TFLOP/s on random data);
  2. the kernel tests on CUDA (the `device` fixture picks "cuda"), -x off, JUnit XML; a test file
     that imports an absent package is left out with a printed note;
  3. `kclub bench <lab>` for every lab at KC_SCALE=full; each benchmark appends its rows as JSON
     lines (shared.benchmarks.record) and stops starting rows at KC_BENCH_DEADLINE;
  4. <out>/report.md and report.json, beside junit.xml and gpu-check.log (four files).
--dry-run does the same on the CPU at ci scale with small budgets (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.benchmarks.report import write_report  # noqa: E402

# The kernel tests; files not in this checkout (a kernel family added later) are left out.
KERNEL_TESTS = ["tests/test_softmax.py", "tests/test_attention.py", "tests/test_sampling.py",
                "tests/test_moe_kernels.py", "tests/test_paged_attention.py",
                "tests/test_paged_rope.py", "tests/test_attention_pallas.py",
                "tests/test_moe_layer.py", "tests/test_quant_formats.py",
                "tests/test_quant_matmul.py", "tests/test_quant_pallas.py",
                "tests/test_megakernel_triton.py"]
OPTIONAL = ["hypothesis", "transformers", "nbval", "jax", "pytest_timeout", "xdist"]
VERSIONS = ["torch", "triton", "jax", "jaxlib", "transformers", "hypothesis", "pytest"]
# Seconds per step. On the first H200 run (docs/gpu-runs/2026-11-27-h200) 246 of the kernel
# tests ran in 130 s on 8 workers before the budget stopped them: they get 200 s now, and the
# whole run 480 s, which fits one 10-minute device call with the machine's start-up outside it.
# The second run (2026-11-28-h200) took 259 s, the tests 118 s; speculative decoding, which now
# runs on the device's Python, needed more than its 35 s.
# GPU-only measurements of kernels whose labs measure on the CPU: (name, module with main())
GPU_EXTRAS = [("megakernel-gpu", "shared.benchmarks.megakernel_gpu")]
BUDGETS = {"tests": 200, "flash-attention": 55, "online-softmax": 25, "moe-routing": 30,
           "speculative-decoding": 75, "paged-attention": 30, "pipeline-parallel": 10,
           "quantization": 35, "megakernel-gpu": 45}
DRY_BUDGETS = {"tests": 60, "default": 25}
RESERVE_S = 8          # kept back from every step for the report itself
LOCAL = {"kernels", "shared", "tests", "scripts", "__future__"}


class Run:
    """The run's clock, output folder, log and report state (rewritten after every step)."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry, self.t0 = out, dry, time.time()
        self.deadline = self.t0 + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "gpu-check.log").open("w")
        self.report = {"schema": 1, "mode": "dry-run (CPU, ci scale)" if dry else "gpu",
                       "complete": False, "partial": ["the run has not finished"],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s,
                       "notes": [], "environment": {}, "tests": {}, "bench": []}

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def note(self, text: str) -> None:
        print(f"gpu-check: {text}", flush=True)
        self.report["notes"].append(text)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        write_report(self.report, self.out)


def child_env(run: Run, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), PYTHONUNBUFFERED="1",
        KC_SCALE="ci" if run.dry else "full", XLA_PYTHON_CLIENT_PREALLOCATE="false", **extra)
    if run.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU path, even on a GPU machine
    return env


def run_step(run: Run, name: str, argv: list[str], env: dict, budget: float) -> dict:
    """Run argv in its own process group for at most `budget` s; on time out, SIGINT first
    (pytest then still writes its JUnit XML), SIGKILL 10 s later."""
    run.log.write(f"\n===== {name}: {' '.join(argv)} (budget {budget:.0f} s)\n")
    run.log.flush()
    t0, timed_out = time.time(), False
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    run.log.write(out or "")
    run.log.flush()
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    print(f"gpu-check: {name}: {status} in {time.time() - t0:.0f} s", flush=True)
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
            "budget_s": round(budget), "tail": (out or "")[-1500:]}


def environment(run: Run) -> None:
    env = {"python": sys.version.split()[0]}
    for pkg in VERSIONS:
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    env["packages missing"] = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    import torch

    cuda = torch.cuda.is_available() and not run.dry
    env["gpu"] = torch.cuda.get_device_name() if cuda else None
    if cuda:
        from shared.benchmarks import gpu_hardware

        env["gpus"] = torch.cuda.device_count()
        env["roofline row"] = gpu_hardware()
        env["ceilings (measured)"] = ceilings()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,temperature.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        env["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["nvidia-smi"] = f"not available ({type(e).__name__})"
    run.report["environment"] = env
    if not cuda and not run.dry:
        run.note("no CUDA GPU visible: the tests and benchmarks below ran on the CPU")


def ceilings() -> dict:
    """The card's own two ceilings (METHOD: measure them, use the datasheet only as a lead):
    a 2 GiB device-to-device copy counting bytes read plus written, and an 8192³ bf16 matmul on
    random data; medians of 10 timed runs after 3 warm-ups, CUDA events."""
    import torch

    def median_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    src = torch.randn(2**29, device="cuda")            # 2 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    src = dst = None                                   # free 4 GiB before the matmul
    n = 8192
    x, w = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = median_ms(lambda: x @ w)
    return {"copy GB/s": round(2 * 2**31 / copy_ms / 1e6, 1),
            "bf16 matmul TFLOP/s": round(2 * n**3 / mm_ms / 1e9, 1)}


def missing_imports(path: Path) -> list[str]:
    """Top-level third-party modules `path` imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    third = names - LOCAL - set(sys.stdlib_module_names)
    return sorted(n for n in third if importlib.util.find_spec(n) is None)


def junit_summary(path: Path) -> dict:
    if not path.exists():
        return {"junit": None}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (bad.get("message") or "").splitlines()[0][:300]
                             if bad.get("message") else ""})
    return {"junit": path.name, "counts": counts, "failures": failures}


def tests_step(run: Run, files: list[str], extra: list[str]) -> None:
    chosen, left_out = [], {}
    for f in files:
        if not (ROOT / f.split("::")[0]).exists():
            run.note(f"{f} left out: not in this checkout")
            continue
        missing = missing_imports(ROOT / f.split("::")[0])
        if missing:
            left_out[f] = missing
            run.note(f"{f} left out: needs {', '.join(missing)}, not installed here")
        else:
            chosen.append(f)
    junit = run.out / "junit.xml"
    argv = [sys.executable, "-m", "pytest", *chosen, "-p", "no:cacheprovider", "-q", "-rfE",
            f"--junitxml={junit}", "-o", "junit_family=xunit2",
            "--continue-on-collection-errors", *extra]
    if importlib.util.find_spec("pytest_timeout"):
        argv.append("--timeout=90")
    if importlib.util.find_spec("xdist") and not run.dry:
        argv += ["-n", "8", "--dist", "loadfile"]   # Triton compiles on 8 of the 16 cores
    budget = min(DRY_BUDGETS["tests"] if run.dry else BUDGETS["tests"], run.left())
    result = {"files": chosen, "left out": left_out}
    if not chosen or budget < 5:
        result["status"] = "not run" if chosen else "no test files"
    else:
        result.update(run_step(run, "tests", argv, child_env(run, KC_POISON="1"), budget))
        result.update(junit_summary(junit))
    run.report["tests"] = result
    run.save()


def bench_step(run: Run, slug: str, module: str, *, lab: bool = True) -> None:
    budget = min(DRY_BUDGETS["default"] if run.dry else BUDGETS.get(slug, 30), run.left())
    entry = {"lab": slug, "module": module, "rows": []}
    if budget < 5:
        entry.update(status="not run", note="out of time before it started")
    else:
        rows = run.out / f".{slug}.jsonl"
        rows.unlink(missing_ok=True)
        env = child_env(run, KC_BENCH_JSON=str(rows),
                        KC_BENCH_DEADLINE=str(time.time() + budget - 5))
        argv = [sys.executable, "-m", "shared.cli", "bench", slug] if lab else \
            [sys.executable, "-m", module]
        entry.update(run_step(run, f"bench {slug}", argv, env, budget))
        if rows.exists():
            entry["rows"] = [json.loads(line) for line in rows.read_text().splitlines() if line]
            rows.unlink()
    run.report["bench"].append(entry)
    run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the report")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--dry-run", action="store_true", help="CPU, ci scale, small budgets")
    ap.add_argument("--labs", help="comma-separated lab slugs (default: every lab)")
    ap.add_argument("--tests", nargs="*", help="test files (default: the kernel tests)")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    args = ap.parse_args(argv)
    if args.budget <= RESERVE_S:
        raise SystemExit(f"--budget must exceed {RESERVE_S} s, got {args.budget}")
    from shared import labs

    run = Run(args.out, args.budget, args.dry_run)
    catalog = labs.discover()
    slugs = args.labs.split(",") if args.labs else list(catalog)
    slugs = [s for s in slugs if s != "extras"]       # --labs ...,extras: the GPU_EXTRAS too
    unknown = [s for s in slugs if s not in catalog]
    if unknown:
        raise SystemExit(f"--labs: no lab {unknown}; labs: {', '.join(catalog)}")
    environment(run)
    run.save()
    tests_step(run, args.tests if args.tests is not None else KERNEL_TESTS,
               ["-k", args.keyword] if args.keyword else [])
    for slug in slugs:
        if catalog[slug].bench:
            bench_step(run, slug, catalog[slug].bench)
    for name, module in GPU_EXTRAS if not args.labs or "extras" in args.labs else ():
        bench_step(run, name, module, lab=False)
    partial = [f"tests: {run.report['tests'].get('status')}"] \
        if run.report["tests"].get("status") in ("timeout", "not run") else []
    partial += [f"{b['lab']}: {b['status']}" for b in run.report["bench"]
                if b["status"] in ("timeout", "not run")]
    run.report.update(complete=not partial, partial=partial)
    run.save()
    run.log.close()
    t = run.report["tests"].get("counts", {})
    failed = t.get("failures", 0) + t.get("errors", 0) + sum(
        b["status"] == "failed" for b in run.report["bench"])
    print(f"gpu-check: report in {args.out}/report.md ({'complete' if not partial else 'PARTIAL'}"
          f", {failed} failing)")
    return 1 if failed or partial else 0


if __name__ == "__main__":
    sys.exit(main())
