"""The Pallas worker loop: 4 simulated TPU cores whose workers block on semaphores, the MLP half
of a layer against float64, race-free under the detector — and the detector sees the race when
a wait is weakened."""

import dataclasses

import jax
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from kernels.megakernel.persistent_pallas import mlp_persistent_pallas
from shared.megakernel.graph import build_mlp_graph
from shared.megakernel.pallas_mlp import mlp_config, mlp_reference, run_mlp
from shared.megakernel.schedule import assign, pallas_tables

RACES = pltpu.InterpretParams(detect_races=True)


def races_found() -> bool:
    # Private: jax 0.10 exposes the detector's verdict only as module state of the interpreter.
    return bool(tpu_interpret.races is not None and tpu_interpret.races.races_found)


def _weights(seed, B=8, D=256, F=384):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, D)).astype(np.float32),
            rng.uniform(0.5, 1.5, (1, D)).astype(np.float32),
            (rng.standard_normal((D, F)) / D ** 0.5).astype(np.float32),
            (rng.standard_normal((D, F)) / D ** 0.5).astype(np.float32),
            (rng.standard_normal((F, D)) / F ** 0.5).astype(np.float32))


@pytest.mark.parametrize("cores", [1, 4])
def test_matches_float64_and_is_race_free(cores):
    args = _weights(np.random.SeedSequence().entropy % 2**32)
    out, parts, graph = run_mlp(*args, cores=cores, tile=128, interpret=RACES)
    assert not races_found(), "a worker read a tile before its producer's signal"
    ref = mlp_reference(*args)
    err = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err
    assert all(np.isfinite(np.asarray(p)).all() for p in parts.values())  # NaN-initialised
    assert len(graph["tasks"]) == 1 + 3 + 2 + 2


def test_a_weakened_wait_is_a_race_the_detector_sees():
    """Control: the down tiles wait for 1 of the 3 SwiGLU tiles they read."""
    args = _weights(1)
    graph = build_mlp_graph(mlp_config(256, 384), 8, tile=128)
    tables = pallas_tables(graph, assign(graph, 4))
    tables["NEED"] = np.where(tables["OP"] == 2, 1, tables["NEED"]).astype(np.int32)
    tables = {k: jax.numpy.asarray(v) for k, v in tables.items()}
    out = mlp_persistent_pallas(tables, *map(jax.numpy.asarray, args), cores=4, tile=128,
                                eps=1e-5, n_events=len(graph["events"]),
                                interpret=dataclasses.replace(RACES, num_cores_or_threads=4))
    jax.block_until_ready(out)
    assert races_found()
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize(("change", "error", "name"), [
    (lambda a: (a[0][:, :100], *a[1:]), ValueError, "w_norm"),
    (lambda a: (a[0].astype(np.float16), *a[1:]), TypeError, "x"),
    (lambda a: (*a[:4], a[4][:, :128]), ValueError, "w_down"),
])
def test_bad_input(change, error, name):
    with pytest.raises(error, match=name):
        run_mlp(*change(_weights(2)), cores=2, interpret=RACES)
    with pytest.raises(ValueError, match="tile"):
        run_mlp(*_weights(2), cores=2, tile=100, interpret=RACES)
    with pytest.raises(ValueError, match="cores"):
        run_mlp(*_weights(2), cores=0, interpret=RACES)
