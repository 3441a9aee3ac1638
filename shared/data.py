"""The training corpus and its tokenizer: the Python standard library's own source.

Every machine that runs this project has the interpreter's standard library on disk, so the
corpus needs no download and no third-party text is committed (but for 2 KB: the held-out
prompts, below): `corpus_text()` reads the top-level ``*.py`` files of
``sysconfig.get_paths()["stdlib"]`` in sorted order. The text is deterministic for a given
Python version; `corpus_fingerprint()` names it so caches of models trained on it
(shared/models/zoo.py) notice when it changes. A model trained under one Python is therefore
scored only where the corpus is the same, except on the eight 256-byte windows of its held-out
split that ship beside the checkpoints (shared/models/checkpoints/held-out.json, CPython
source under the PSF licence), which benchmarks' prompts are cut from on any Python.

Tokens are raw UTF-8 bytes (vocab 256): no tokenizer to train or ship, and code is mostly ASCII.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

SEPARATOR = "\n\n# ---- {name} ----\n\n"  # marks file boundaries inside the corpus


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> list[Path]:
    """Top-level ``*.py`` files of the standard library, sorted by name (deterministic)."""
    files = sorted(p for p in stdlib_dir().glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files found in the standard library at {stdlib_dir()}")
    return files


def corpus_text(max_bytes: int | None = None) -> str:
    """The corpus: the stdlib files joined with a header line each, at most `max_bytes` bytes.

    The cut happens on a byte count, and a multi-byte character split by it is dropped, so
    ``len(corpus_text(n).encode()) <= n``.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    parts: list[bytes] = []
    size = 0
    for path in corpus_files():
        chunk = SEPARATOR.format(name=path.name).encode() + path.read_bytes()
        parts.append(chunk)
        size += len(chunk)
        if max_bytes is not None and size >= max_bytes:
            break
    data = b"".join(parts)
    if max_bytes is not None:
        data = data[:max_bytes]
    return data.decode("utf-8", errors="ignore")


def corpus_fingerprint(max_bytes: int | None = None) -> str:
    """Short hash of the corpus text (changes with the Python version that supplies it)."""
    return hashlib.sha256(corpus_text(max_bytes).encode()).hexdigest()[:12]


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value, vocab_size = 256."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Inverse of `encode`; accepts a list of ints or a 1-D tensor. Bad bytes become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def train_val_tokens(
    max_bytes: int | None = None, *, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as 1-D int64 token tensors: the first (1 - val_fraction) for training,
    the tail for validation (a contiguous split, so no file leaks across it except one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = torch.tensor(ByteTokenizer().encode(corpus_text(max_bytes)), dtype=torch.long)
    n_val = max(1, int(len(ids) * val_fraction))
    return ids[:-n_val], ids[-n_val:]


def batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of `tokens`: (inputs [B, T], targets [B, T]), targets shifted by 1.

    Window starts come from `generator`, so a seeded generator gives the same batches.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        raise ValueError("tokens must be a 1-D tensor")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    tokens = tokens.long()
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        window = tokens[starts[:, None] + offsets]  # [B, T+1]
        yield window[:, :-1], window[:, 1:]
