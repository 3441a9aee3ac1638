"""Parallelism on torch.distributed and JAX, one folder per kind (picotron's layout).

Imports go one way: ``launch`` (process groups, ports, timeouts) at the bottom, each kind's
algorithm and its communication file above it, the training entry points on top.
"""
