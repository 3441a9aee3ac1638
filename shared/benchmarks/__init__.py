"""Each lab's measurements (`kclub bench <slug>` runs a module's `main()`), and what they share.

A benchmark prints its table for people and, through `record`, appends each row as one JSON
object to the file named by KC_BENCH_JSON when that is set (scripts/gpu_check.py sets it), so
a report collects structured rows even from a run stopped at its time budget. KC_BENCH_DEADLINE
(Unix time) tells a long sweep when to stop starting rows: `out_of_time()`.
"""

from __future__ import annotations

import json
import math
import os
import time

from shared import roofline

# What torch.cuda.get_device_name() says -> the row of shared.roofline.HARDWARE it is.
_GPU_ROWS = (("H200", "H200"), ("H100", "H100 SXM"), ("A100", "A100 80GB"))


def record(section: str, row: dict) -> dict:
    """Print `row` and append it, tagged with `section`, to $KC_BENCH_JSON; return it."""
    print(f"{section}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()), flush=True)
    path = os.environ.get("KC_BENCH_JSON")
    if path:
        with open(path, "a") as f:   # one line per row: a row written survives a later kill
            f.write(json.dumps({"section": section, **row}) + "\n")
    return row


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def out_of_time(reserve_s: float = 0.0) -> bool:
    """True once KC_BENCH_DEADLINE (Unix time) is less than `reserve_s` away; never if unset."""
    deadline = os.environ.get("KC_BENCH_DEADLINE")
    return deadline is not None and time.time() + reserve_s >= float(deadline)


def gpu_hardware() -> str | None:
    """The roofline row of this machine's CUDA GPU ("H100 SXM", ...), None if not in the table.

    An H100 PCIe would read as the SXM row (higher bandwidth and peak): its % would read low."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((row for key, row in _GPU_ROWS if key in name), None)


def pct_of_roofline(seconds: float, flops: float, bytes_moved: float, hw: str | None,
                    dtype: str) -> float | None:
    """Measured time against the roofline time of (flops, bytes) on `hw`, in percent: 100 means
    the kernel runs at the bound. None (JSON null) when the hardware has no row."""
    if hw is None or not seconds > 0 or not math.isfinite(seconds):
        return None
    return 100.0 * roofline.predict(flops, bytes_moved, hw, dtype).time_s / seconds
