"""`kclub`: list the labs, run one headless, strip it for commit, run benchmarks, print the
claims table, serve the tiny Llama over an OpenAI-compatible API and load it with a trace."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from shared import labs  # claims (and through it torch) load only where used: --help is quick
from shared.paths import lab_build_dir


def cmd_list(_args) -> int:
    for lab in labs.discover().values():
        bench = lab.bench or "—"
        print(f"{lab.slug:24s} {lab.title:36s} papers: {', '.join(lab.papers)}  bench: {bench}")
    for path in labs.strays():
        print(f"note: labs/{path.name} is not a lab (no kclub metadata): left out",
              file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    """Execute labs/<slug>.ipynb cell by cell into build/<slug>/; non-zero exit on failure.

    Whatever stops the run (a failing cell, a cell past --cell-timeout, a dead kernel, Ctrl-C),
    the partly executed notebook is saved and the cell is named. The lab's own progress bars
    (tqdm writes to stderr) come through to this terminal as the cells run."""
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from tqdm import tqdm

    from shared import claims

    lab = labs.get(args.slug)
    out_dir = lab_build_dir(lab.slug)
    nb = nbformat.read(lab.notebook, as_version=4)
    client = _forwarding_client()(nb, timeout=args.cell_timeout, kernel_name=lab_kernel(),
                                  resources={"metadata": {"path": str(lab.notebook.parent)}})
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    before = claims.latest(lab.slug)
    stopped, t0, bar = None, time.perf_counter(), None
    try:
        with client.setup_kernel():
            bar = tqdm(code, desc=lab.slug, unit="cell")
            for i, cell in bar:
                try:
                    client.execute_cell(cell, i)
                except CellTimeoutError:
                    stopped = (i, f"timed out after {args.cell_timeout} s (--cell-timeout)")
                except DeadKernelError as e:
                    stopped = (i, f"the kernel died: {e}")
                except CellExecutionError as e:
                    stopped = (i, f"raised:\n{e}")
                except KeyboardInterrupt:
                    stopped = (i, "interrupted (Ctrl-C)")
                if stopped:
                    break
    finally:
        if bar is not None:
            bar.close()
        executed = out_dir / f"{lab.slug}.ipynb"
        nbformat.write(nb, executed)     # partly executed, if the run stopped early
    seconds = time.perf_counter() - t0
    reached = sum(c.execution_count is not None for _, c in code)
    print(f"\n{lab.title}: {reached} of {len(code)} code cells run in {seconds:.1f} s -> "
          f"{executed}")
    figures = sorted(p.name for p in out_dir.glob("*.png"))
    print(f"figures: {', '.join(figures) or 'none'}")
    run = claims.latest(lab.slug)
    if run is None or (before is not None and run.run == before.run):
        print("this run recorded no claims" + (f" (the last complete scoreboard, run {before.run}"
              ", is unchanged)" if before is not None and before.complete else ""))
    else:
        print(claims.table(run.claims))
        if not run.complete:
            print(f"claims run {run.run} did not finish (no rec.finish()): the last complete "
                  "scoreboard of this lab is kept")
    if stopped:
        i, why = stopped
        first = nb.cells[i].source.strip().splitlines()
        print(f"\nSTOPPED at cell {i} ({first[0][:80] if first else 'empty'!r}): {why}\n"
              f"the partly executed notebook is {executed}", file=sys.stderr)
        return 1
    print("PASSED")
    return 0


def _forwarding_client():
    """nbclient's NotebookClient, echoing the kernel's stderr stream (the lab's tqdm bars) to
    this terminal as it arrives; everything is still stored in the notebook."""
    from nbclient import NotebookClient

    class Forwarding(NotebookClient):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream" and msg["content"].get("name") == "stderr":
                sys.stderr.write(msg["content"].get("text", ""))
                sys.stderr.flush()
            return super().output(outs, msg, display_id, cell_index)

    return Forwarding


KERNEL = "kernel-club"   # the kernelspec `make setup` installs inside .venv


def lab_kernel() -> str:
    """The labs' kernel: the project's own kernelspec, never a bare "python3" (a user-level
    kernel of that name can shadow this environment's)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise SystemExit(f"kclub: no '{KERNEL}' Jupyter kernel: `make setup` installs it "
                         f"(python -m ipykernel install --sys-prefix --name {KERNEL})") from None
    return KERNEL


def lab_server_argv(port: int = 8888) -> list[str]:
    """JupyterLab served from the repository root (so a lab's links to ../papers/ and the
    shared/ files its exercises edit open), the browser opening on labs/; localhost only, with
    Jupyter's token on (its default)."""
    from shared.paths import ROOT

    argv = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={ROOT}",
            "--ServerApp.default_url=/lab/tree/labs",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--no-browser"]
    if os.geteuid() == 0:  # containers often run as root; Jupyter refuses without this
        argv.append("--allow-root")
    return argv


def cmd_lab(args) -> int:
    os.execv(sys.executable, lab_server_argv(args.port))


CHECKED = "# NBVAL_CHECK_OUTPUT"


def cmd_strip(args) -> int:
    """Prepare a lab for commit: clear every output except those of `# NBVAL_CHECK_OUTPUT`
    cells, which are taken from the last `kclub run` (build/<slug>/<slug>.ipynb)."""
    import nbformat

    lab = labs.get(args.slug)
    nb = nbformat.read(lab.notebook, as_version=4)
    executed_path = lab_build_dir(lab.slug) / f"{lab.slug}.ipynb"
    executed = nbformat.read(executed_path, as_version=4) if executed_path.exists() else None
    kept = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.execution_count = None
        cell.outputs = []
        cell.metadata.pop("execution", None)
        if cell.source.lstrip().startswith(CHECKED):
            if executed is None or executed.cells[i].source != cell.source:
                print(f"kclub: run the lab first (kclub run {lab.slug}): cell {i} is checked "
                      "but has no current executed output", file=sys.stderr)
                return 1
            cell.outputs = [o for o in executed.cells[i].outputs
                            if o.get("name") == "stdout" or o.output_type != "stream"]
            cell.execution_count = executed.cells[i].execution_count  # nbval needs it
            kept += 1
    nbformat.write(nb, lab.notebook)
    print(f"{lab.notebook.name}: outputs cleared; kept {kept} checked cell(s)")
    return 0


def cmd_bench(args) -> int:
    chosen = [labs.get(args.slug)] if args.slug else list(labs.discover().values())
    status = 0
    for lab in chosen:
        if not lab.bench:
            print(f"{lab.slug}: no benchmark")
            continue
        print(f"== {lab.slug}: {lab.bench} ==")
        status |= importlib.import_module(lab.bench).main() or 0
    return status


def cmd_claims(args) -> int:
    """Each lab's last complete run, grouped by lab; corrupt files are reported and skipped."""
    from shared import claims

    runs = claims.load_runs(args.lab)
    if args.json:
        print(json.dumps(claims.as_json(runs), indent=1))
    elif not runs:
        print("no claims yet: run a lab first (kclub run <slug>, or make test)")
    else:
        print(claims.report(runs))
    return 0


def cmd_compile(args) -> int:
    """Compile every public kernel for real GPUs/TPU from this machine (shared/compile_report)."""
    from shared import compile_report

    try:
        compile_report.parse_targets(args.target)
        compile_report.parse_families(args.family)
    except ValueError as e:
        print(f"kclub: {e}", file=sys.stderr)
        return 2
    child = compile_report.in_compile_mode(
        ["compile", "--target", args.target] + (["--json"] if args.json else [])
        + (["--family", args.family] if args.family else []))
    if child is not None:
        return child
    return compile_report.main(args.target, args.json, args.family)


def cmd_serve(args) -> int:
    """The OpenAI-compatible server on the serving engine (shared/serving/server.py)."""
    from shared.serving.server import serve

    return serve(args.host, args.port, args.model)


def cmd_loadgen(args) -> int:
    """Replay a Poisson or bursty trace against a server (shared/serving/loadgen.py)."""
    from shared.serving import loadgen

    return loadgen.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kclub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the labs").set_defaults(fn=cmd_list)
    run = sub.add_parser("run", help="execute a lab headless into build/<slug>/")
    run.add_argument("slug")
    run.add_argument("--cell-timeout", type=int, default=900)
    run.set_defaults(fn=cmd_run)
    bench = sub.add_parser("bench", help="run a lab's benchmark (all labs without a slug)")
    bench.add_argument("slug", nargs="?")
    bench.set_defaults(fn=cmd_bench)
    lab = sub.add_parser("lab", help="serve JupyterLab on labs/ (localhost, token on)")
    lab.add_argument("--port", type=int, default=8888)
    lab.set_defaults(fn=cmd_lab)
    strip = sub.add_parser("strip", help="clear a lab's outputs for commit, keeping the "
                           "# NBVAL_CHECK_OUTPUT cells' outputs from its last run")
    strip.add_argument("slug")
    strip.set_defaults(fn=cmd_strip)
    cl = sub.add_parser("claims", help="the claims table from the labs' last runs")
    cl.add_argument("--lab")
    cl.add_argument("--json", action="store_true", help="the same data as JSON")
    cl.set_defaults(fn=cmd_claims)
    comp = sub.add_parser("compile", help="compile every kernel for sm_80/sm_90 and lower the "
                          "Pallas ones for TPU, from this machine: registers, spills, shared "
                          "memory, instruction mix; non-zero exit on any failure")
    comp.add_argument("--target", default="sm_80,sm_90,tpu",
                      help="comma-separated: sm_80, sm_90, tpu (default: all)")
    comp.add_argument("--json", action="store_true", help="JSON instead of a table")
    comp.add_argument("--family", help="comma-separated kernel families: softmax, attention, "
                      "sampling, moe, paged and each kernels/<pkg>/compile_cases.py's "
                      "(default: all)")
    comp.set_defaults(fn=cmd_compile)
    srv = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/models, "
                         "/v1/completions, /v1/chat/completions) on the serving engine")
    srv.add_argument("--host", default="127.0.0.1", help="default: localhost only")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model", choices=["target", "draft"], default="target")
    srv.set_defaults(fn=cmd_serve)
    lg = sub.add_parser("loadgen", help="replay a Poisson or bursty arrival trace against an "
                        "OpenAI-compatible server: TTFT and TBT p50/p99, throughput")
    from shared.serving.loadgen import add_arguments
    add_arguments(lg)
    lg.set_defaults(fn=cmd_loadgen)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return args.fn(args)
    except labs.UnknownLab as e:  # a KeyError inside a lab or benchmark is not a bad slug
        print(f"kclub: {e.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
