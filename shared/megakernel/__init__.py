"""Mega-kernels (Mirage Persistent Kernel, arXiv 2512.22219): a decode step as a task graph
(graph), its checks (validate), worker queues and the kernel's tables (schedule), the two ways
to run it (runtime) and a discrete-event simulator of both on a GPU (simulate)."""
