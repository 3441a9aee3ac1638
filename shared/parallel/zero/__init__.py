"""Data parallelism and ZeRO (Rajbhandari et al. 2020), one file per idea, imports going down:

flat (a unit's parameters as one padded, freeable buffer) -> comm (collectives in order on one
communication thread: ring or gloo) -> engine (DDP and ZeRO-1/2/3) -> worker (what each rank
runs, the one-process reference, FSDP2, torchrun entry point); model (the tied/frozen test
model), accounting (the paper's formulas), timeline (drawing a step), jax_zero (ZeRO-3 in
shard_map; imports jax, so import it by name).
"""
