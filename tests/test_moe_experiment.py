"""shared/moe/experiment.py: the training experiment runs every router and logs what it claims."""

import math

import pytest
import torch

from shared.data import ByteTokenizer
from shared.moe import moe_layers
from shared.moe.experiment import ROUTERS, MoERun, dropped_vs_capacity, t_interval, train_moe

RUN = MoERun(steps=4, batch_size=4, seq_len=16, dim=32, n_layers=1, n_heads=2, experts=4,
             expert_ffn=16, capacity_factor=1.0)


@pytest.fixture(scope="module")
def tokens():
    text = "def f(x):\n    return x + 1\n" * 40
    ids = torch.tensor(ByteTokenizer().encode(text))
    return ids[:800], ids[800:]


@pytest.mark.parametrize("kind", ROUTERS)
def test_every_router_trains_and_logs_one_entry_per_step(kind, tokens):
    model, hist = train_moe(kind, RUN, *tokens)
    assert len(hist.loss) == len(hist.imbalance) == len(hist.dropped) == RUN.steps
    assert all(math.isfinite(v) for v in hist.loss) and math.isfinite(hist.val_loss)
    assert all(v >= 1.0 for v in hist.imbalance)          # max/mean is at least 1
    assert all(0.0 <= v < 1.0 for v in hist.dropped)
    if kind == "DeepSeek-V3 bias":                        # the bias moved after each step
        assert all(m.router.bias.abs().sum() > 0 for m in moe_layers(model))


def test_dropped_share_falls_as_capacity_grows(tokens):
    model, _ = train_moe("top-2, no loss", RUN, *tokens)
    curve = dropped_vs_capacity(model, tokens[1], RUN, [0.25, 0.5, 1.0, 2.0, 4.0])
    values = [curve[f] for f in sorted(curve)]
    assert values == sorted(values, reverse=True)
    assert values[0] > 0 and values[-1] == 0.0            # cf = E / k: nothing can overflow


def test_t_interval_matches_student_t():
    stats = pytest.importorskip("scipy.stats")   # scipy comes with jax
    for n in range(2, 11):
        values = [float(i * i % 7) for i in range(n)]
        mean, low, high = t_interval(values)
        sem = stats.sem(values)
        lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
        assert (low + high) / 2 == pytest.approx(sum(values) / n)
        assert high - low == pytest.approx(hi - lo, rel=1e-3)   # t to 3 decimals
    with pytest.raises(ValueError, match="2 to 10 seeds"):
        t_interval([1.0])
