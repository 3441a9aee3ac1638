"""The tiny Llama: config checks, stage-by-stage use, the FFN hook, equal logits with
transformers' LlamaForCausalLM, the KV cache (incremental, per-sequence, rollback), the corpus,
training reproducibility and the shipped checkpoints."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bench import one_thread
from shared.data import ByteTokenizer, batches, corpus_files, corpus_text, train_val_tokens
from shared.inference.kv_cache import KVCache
from shared.models import Llama, LlamaConfig, zoo
from shared.models.hf import to_hf
from shared.train import TrainConfig, train

SMALL = LlamaConfig(vocab_size=256, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=80,
                    max_seq_len=64)


def small_model(seed=0, config=SMALL):
    torch.manual_seed(seed)
    return Llama(config).eval()


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        LlamaConfig(256, 48, 2, 5, 1, 64, 32)  # 48 % 5
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(256, 48, 2, 6, 4, 64, 32)  # 6 % 4
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(256, 45, 2, 3, 1, 64, 32)  # head_dim 15
    with pytest.raises(ValueError, match="dim"):
        LlamaConfig(256, 0, 2, 3, 1, 64, 32)


def test_stagewise_forward_equals_forward_and_ffn_hook():
    model = small_model()
    tokens = torch.randint(0, 256, (2, 13))
    h = model.embed(tokens)
    for block in model.layers:
        h = block(h)
    assert torch.equal(model.lm_head(model.norm(h)), model(tokens))

    calls = []

    class Doubler(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return 2 * x

    hooked = Llama(SMALL, ffn_factory=lambda cfg, i: Doubler())
    assert hooked(tokens).shape == (2, 13, 256) and len(calls) == SMALL.n_layers


def test_early_exit_forward():
    model = small_model()
    tokens = torch.randint(0, 256, (2, 9))
    full, early = model.forward_with_exit(tokens, 2)
    torch.testing.assert_close(full, model(tokens))
    torch.testing.assert_close(early, model(tokens, n_layers=2))
    with pytest.raises(ValueError, match="n_layers"):
        model(tokens, n_layers=4)


@settings(max_examples=4)
@given(B=st.integers(1, 3), T=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_logits_equal_transformers_llama(B, T, seed):
    model = small_model(seed)
    tokens = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(tokens), to_hf(model)(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_trained_target_equals_transformers():
    model = zoo.load("target", train_if_missing=False)
    tokens = torch.tensor([ByteTokenizer().encode("def __init__(self, name):\n        self.")])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), to_hf(model)(tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_kv_cache_incremental_and_rollback(device):
    model = small_model(1).to(device)
    tokens = torch.randint(0, 256, (3, 30), device=device)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(SMALL, 3, device=device)
        steps = [model(tokens[:, :11], cache=cache)]
        cache.advance(11)
        for t in range(11, 30, 4):  # chunks of 4, the last one ragged
            chunk = tokens[:, t:t + 4]
            steps.append(model(chunk, cache=cache))
            cache.advance(chunk.shape[1])
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        # Per-sequence rollback: sequence b keeps its first L_b tokens, then continues with
        # other tokens; stale entries past L_b must not leak into attention.
        lengths = [4, 17, 30 - 3]
        cache.set_lengths(torch.tensor(lengths, device=device))
        new = torch.randint(0, 256, (3, 3), device=device)
        out = model(new, cache=cache)
        for b in range(3):
            ref = model(torch.cat([tokens[b, :lengths[b]], new[b]])[None])[0, -3:]
            torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long, device=device))
    # Lengths given on the host are checked; on the device only under KC_DEBUG=1
    # (test_inference.py), since reading them back would sync.
    with pytest.raises(ValueError, match="lengths"):
        cache.set_lengths([0, 1, 65])
    with pytest.raises(ValueError, match="lengths"):
        cache.set_lengths(-1)


def test_corpus_tokenizer_batches():
    assert corpus_files() == sorted(corpus_files()) and len(corpus_files()) > 50
    text = corpus_text(5000)
    assert text == corpus_text(5000) and 4990 < len(text.encode()) <= 5000
    assert "# ---- " in text and "import" in text
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode("é∑"))) == "é∑"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])
    train_ids, val_ids = train_val_tokens(20000, val_fraction=0.25)
    assert len(train_ids) + len(val_ids) == len(text.encode()[:0]) + len(corpus_text(20000)
                                                                           .encode())
    assert len(val_ids) == len(train_ids) // 3
    x1, y1 = next(batches(train_ids, 4, 16, generator=torch.Generator().manual_seed(3)))
    x2, _ = next(batches(train_ids, 4, 16, generator=torch.Generator().manual_seed(3)))
    assert x1.shape == y1.shape == (4, 16) and x1.dtype == torch.long and torch.equal(x1, x2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    with pytest.raises(ValueError, match="seq_len"):
        next(batches(train_ids[:10], 2, 16, generator=torch.Generator()))


@pytest.fixture
def single_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits on a shared, busy CPU."""
    with one_thread():
        yield


def test_training_is_seeded_and_learns(single_thread):
    train_ids, val_ids = train_val_tokens(60000)
    config = LlamaConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=64, max_seq_len=32)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup=3, seed=4,
                      exit_layer=1)
    runs = []
    for steps in (30, 3):
        torch.manual_seed(cfg.seed)
        model = Llama(config)
        short = TrainConfig(**{**cfg.__dict__, "steps": steps})
        runs.append((model, train(model, train_ids, val_ids, short, progress=False)))
    (_, long_run), (_, short_run) = runs
    assert long_run.losses[:2] == short_run.losses[:2]  # same seed, same batches and updates
    assert long_run.losses[0] > 5.0  # ln 256 = 5.55: uniform over bytes at the start
    assert sum(long_run.losses[-5:]) / 5 < 3.6 and long_run.val_loss < 3.8
    assert long_run.val_loss_exit is not None


@pytest.mark.parametrize("name", ["target", "draft"])
def test_shipped_checkpoints_match_recipe(name):
    """CI must not retrain: the committed checkpoints were made by the current recipes."""
    ckpt = zoo.checkpoint(name, train_if_missing=False)
    assert ckpt["recipe_hash"] == zoo.recipe_hash(name)
    model = zoo.load(name, train_if_missing=False)
    assert model.config == zoo.RECIPES[name][0]
    assert ckpt["val_loss"] < 2.0 and len(ckpt["losses"]) == zoo.RECIPES[name][1].steps
