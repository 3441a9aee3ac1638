"""The persistent mega-kernel (Mirage Persistent Kernel, arXiv 2512.22219): one launch runs a
decode step's task graph, workers waiting on event counters. Triton (persistent_triton, with the
task bodies in tasks_triton) and Pallas on TPU semaphores (persistent_pallas)."""

from kernels.megakernel.persistent_triton import OPS, TASK_WIDTH, launch

__all__ = ["OPS", "TASK_WIDTH", "launch"]
