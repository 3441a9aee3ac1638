"""The Pallas mega-kernel: a whole decode step by workers on simulated TPU cores that block on
semaphores, against float64 and token for token; race-free under the detector, which sees the
race when a wait is weakened; the signal tables proven under adversarial interleavings."""

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from shared.inference.kv_cache import KVCache
from shared.megakernel.graph import build_decode_graph
from shared.megakernel.pallas_decode import PallasDecoder, _step, pallas_tables
from shared.megakernel.runtime import eager_step
from shared.megakernel.schedule import assign
from shared.megakernel.validate import validate
from shared.models.llama import Llama, LlamaConfig

# On a GPU host: run the TPU kernel in interpret mode on JAX's CPU device (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tpu_interpret_on_cpu")
RACES = pltpu.InterpretParams(detect_races=True)
# Odd on purpose: a vocabulary that is not whole tiles (padded lm-head), 3 sequences, GQA 2.
CONFIG = LlamaConfig(vocab_size=200, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
                     max_seq_len=32)


def races_found() -> bool:
    # Private: jax 0.10 exposes the detector's verdict only as module state of the interpreter.
    return bool(tpu_interpret.races is not None and tpu_interpret.races.races_found)


def _model(seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(CONFIG).eval()
    with torch.no_grad():                      # non-trivial norm weights, not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("cores", [1, 4])
def test_decode_steps_match_float64_token_for_token_race_free(cores):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    model, B, max_len = _model(seed), 3, 6
    dec = PallasDecoder(model, B, max_len=max_len, cores=cores, interpret=RACES)
    ref = copy.deepcopy(model).double()
    cache = KVCache(CONFIG, B, max_len=max_len, dtype=torch.float64)
    tokens = torch.randint(0, CONFIG.vocab_size, (B,))
    for step in range(2):
        logits, nxt = dec.step(tokens.numpy())
        jax.block_until_ready(dec.acts)
        assert not races_found(), f"step {step}: a read before its producer's signal"
        with torch.no_grad():
            ref_logits, ref_next = eager_step(ref, cache, tokens)
        err = np.abs(logits - ref_logits.numpy()).max() / np.abs(ref_logits.numpy()).max()
        assert err < 1e-5, (seed, step, err)
        assert np.array_equal(nxt, ref_next.numpy()), (seed, step, nxt, ref_next)
        # interpret mode fills fresh buffers with NaN: every activation was written this step
        assert all(np.isfinite(np.asarray(a)).all() for a in dec.acts.values())
        tokens = torch.as_tensor(nxt)
    assert list(dec.lengths) == [2] * B


def test_a_weakened_wait_is_a_race_the_detector_sees():
    """Control: the output-projection tiles wait for 1 of the 6 attention tasks they read."""
    dec = PallasDecoder(_model(1), 3, max_len=4, cores=4, interpret=RACES)
    weak = dict(dec.tables)
    is_o = np.asarray(weak["OP"]) == 3               # OPS["o_proj"]
    weak["NEED"] = jax.numpy.asarray(np.where(is_o, 1, np.asarray(weak["NEED"])), np.int32)
    tables = weak | {"TOK": jax.numpy.zeros(3, np.int32), "POS": jax.numpy.zeros(3, np.int32)}
    out = _step(tables, dec.weights, dec.k_cache, dec.v_cache, dims=dec.dims, cores=4,
                n_events=len(dec.graph["events"]), eps=dec.eps, interpret=dec.interpret)
    jax.block_until_ready(out)
    assert races_found()
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("seed", range(6))
def test_signal_tables_never_let_a_task_start_early(seed):
    """The tables' protocol, simulated: cores run their queues in order, interleaved at random;
    a task starts only when its core's counter holds NEED signals. Every task must find all
    producers of its events finished, every queue must finish, every counter end at zero."""
    rng = np.random.default_rng(seed)
    config = dataclasses.replace(CONFIG, n_layers=int(rng.integers(1, 3)))
    graph = build_decode_graph(config, int(rng.integers(1, 5)), tile=int(rng.choice([64, 128])))
    cores = int(rng.integers(1, 7))
    tables = pallas_tables(graph, assign(graph, cores, validate(graph, dataflow=False)))
    producers: dict[int, set[int]] = {}
    for t in graph["tasks"]:
        for e in t["triggers"]:
            producers.setdefault(e, set()).add(t["id"])
    count = np.zeros((cores, len(graph["events"])), int)
    head, done = [0] * cores, set()
    while True:
        ready = []
        for c in range(cores):
            if head[c] < tables["QLEN"][c]:
                t = tables["QUEUE"][c, head[c]]
                e = tables["WAIT"][t]
                if e < 0 or count[c, e] >= tables["NEED"][t]:
                    ready.append(c)
        if not ready:
            break
        c = int(rng.choice(ready))
        t = int(tables["QUEUE"][c, head[c]])
        if tables["WAIT"][t] >= 0:
            count[c, tables["WAIT"][t]] -= tables["NEED"][t]
        for e in graph["tasks"][t]["waits"]:
            assert producers[e] <= done, f"task {t} started before all producers of event {e}"
        for j in range(tables["SIG_START"][t], tables["SIG_START"][t + 1]):
            count[tables["SIG_CORE"][j], tables["SIG_EVENT"][j]] += 1
        done.add(t)
        head[c] += 1
    assert len(done) == len(graph["tasks"]), "a core was left waiting: deadlock"
    assert not count.any(), "signals left over: a semaphore would not end at zero"


def test_bad_input():
    model = _model(2)
    with pytest.raises(ValueError, match="tile"):
        PallasDecoder(model, 2, tile=100)
    with pytest.raises(ValueError, match="cores"):
        PallasDecoder(model, 2, cores=0)
    with pytest.raises(ValueError, match="NPROC"):
        PallasDecoder(model, 2, cores=64, interpret=RACES)
    with pytest.raises(ValueError, match="batch"):
        PallasDecoder(model, 0)
    with pytest.raises(ValueError, match="max_len"):
        PallasDecoder(model, 2, max_len=CONFIG.max_seq_len + 1)
    with pytest.raises(TypeError, match="float32"):
        PallasDecoder(copy.deepcopy(model).half(), 2)
    with pytest.raises(TypeError, match="model"):
        PallasDecoder("llama", 2)
    dec = PallasDecoder(model, 2, max_len=1, cores=2, interpret=RACES)
    for bad in ([1, 2, 3], [1.0, 2.0], [0, CONFIG.vocab_size]):
        with pytest.raises(ValueError, match="tokens"):
            dec.step(np.asarray(bad))
    dec.step(np.asarray([1, 2]))
    with pytest.raises(ValueError, match="full"):
        dec.step(np.asarray([1, 2]))
