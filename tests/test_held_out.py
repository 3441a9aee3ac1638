"""The held-out prompts the speculative-decoding benchmark reads: shipped with the checkpoints,
equal to the windows of the split the models were validated on, and the same under another
Python (simulated: another stdlib's fingerprint and split), while `held_out_tokens` — the whole
split, which only the training corpus has — still refuses there."""

import json

import pytest
import torch

from shared.benchmarks import speculative_decoding as sd
from shared.models import zoo

NAMES = ("target", "draft")


def _old_prompts(count, length):
    """The benchmark's prompts as it cut them before the sample shipped: prompt i at
    i · (len // count) of this machine's split."""
    val = zoo.held_out_tokens(*NAMES)
    stride = len(val) // count
    return [val[i * stride:i * stride + length] for i in range(count)]


def _other_python(monkeypatch):
    """This process as a Python whose stdlib differs: another fingerprint, another split."""
    monkeypatch.setattr(zoo, "corpus_fingerprint", lambda: "e593fcbc81b8")
    split = torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)
    monkeypatch.setattr(zoo, "train_val_tokens", lambda: split)


def test_sample_is_the_validated_split_and_survives_another_stdlib(monkeypatch):
    corpus, windows = zoo.held_out_sample()
    assert all(zoo.checkpoint(n)["corpus"] == corpus for n in NAMES)
    here = {n: zoo.held_out_prompts(n, 48, *NAMES) for n in (1, 2, 4, 8)}
    for n, prompts in here.items():   # this machine's corpus is the checkpoints': compare
        assert all(torch.equal(a, b) for a, b in zip(prompts, _old_prompts(n, 48), strict=True))
    assert torch.equal(torch.stack(windows), torch.stack(_old_prompts(8, zoo.HELD_OUT_LENGTH)))
    before = sd.setup(n_prompts=2, n_new=4).prompts

    _other_python(monkeypatch)
    with pytest.raises(ValueError, match="fingerprint e593fcbc81b8 .* differs"):
        zoo.held_out_tokens("target")             # the whole split is still guarded
    after = sd.setup(n_prompts=2, n_new=4).prompts
    assert [p.shape for p in after] == [(1, 48)] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for n, prompts in here.items():
        assert all(torch.equal(a, b) for a, b in
                   zip(prompts, zoo.held_out_prompts(n, 48, *NAMES), strict=True))


def test_models_of_another_corpus_need_their_own_split(monkeypatch):
    """A checkpoint retrained on another corpus (a new recipe) cannot use the sample: its
    windows come from this machine's split, which must then be that corpus."""
    real = zoo.checkpoint

    def retrained(name, **kw):
        return {**real(name, **kw), "corpus": "0123456789ab"}

    monkeypatch.setattr(zoo, "checkpoint", retrained)
    here = zoo.corpus_fingerprint()
    with pytest.raises(ValueError, match=f"fingerprint {here} .* differs from the 0123456789ab"):
        zoo.held_out_prompts(2, 48, "target")
    monkeypatch.setattr(zoo, "corpus_fingerprint", lambda: "0123456789ab")
    got = zoo.held_out_prompts(2, 48, "target")   # the fall-back: cut from this split
    assert all(torch.equal(a, b) for a, b in zip(got, _old_prompts(2, 48), strict=True))


def test_a_damaged_sample_and_bad_arguments_are_named(tmp_path):
    sample = json.loads(zoo.HELD_OUT.read_text())
    sample["windows"][3] = sample["windows"][3].replace("e", "x", 1)
    path = tmp_path / "held-out.json"
    path.write_text(json.dumps(sample))
    with pytest.raises(ValueError, match="SHA-256"):
        zoo.held_out_sample(path)
    for count in (0, 3, 16, 2.0):
        with pytest.raises(ValueError, match="count must divide 8"):
            zoo.held_out_prompts(count, 48, "target")
    for length in (0, 257):
        with pytest.raises(ValueError, match="length"):
            zoo.held_out_prompts(2, length, "target")
    with pytest.raises(ValueError, match="names"):
        zoo.held_out_prompts(2, 48)
