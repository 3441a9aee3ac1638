"""Expert parallelism: experts sharded over ranks, tokens moved by all-to-all (layer.py),
the communication beside it (comm.py), and a runner that checks it against one process (run.py).
"""
