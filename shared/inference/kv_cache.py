"""A batched key/value cache whose sequences each have their own length, and can roll back.

Speculative decoding writes the γ drafted tokens into the target's cache while verifying them,
then keeps only the accepted prefix. Rolling back is just lowering ``lengths``: the attention
mask in shared/models/llama.py lets a query at position p see keys 0..p only, and the next
write at position p overwrites whatever a rejected token left there.

``lengths`` stays on the device and is never read back during decoding: a layer attends over
all ``max_len`` slots, the mask hiding the unused ones (gpt-fast's static cache). Slicing to
the longest sequence would need that length on the host, a device sync at every layer.
Callers size the cache to the call (generate: prompt + new tokens), so at most about half the
slots are idle. Checks of device-held values run only under KC_DEBUG=1.
"""

from __future__ import annotations

import torch

from shared.models.llama import LlamaConfig, debug_checks


class KVCache:
    """Buffers k, v: [n_layers, B, n_kv_heads, max_len, head_dim]; lengths: int64 [B].

    ``max_len`` (default: the model's max_seq_len) sizes the buffers to what a call needs."""

    def __init__(self, config: LlamaConfig, batch_size: int, *, n_layers: int | None = None,
                 max_len: int | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        max_len = config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be in [1, {config.max_seq_len}], got {max_len}")
        n_layers = config.n_layers if n_layers is None else n_layers
        shape = (n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._batch = torch.arange(batch_size, device=device)[:, None]  # [B, 1]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at ``positions`` [B, T]; return the layer's keys/values at
        every slot 0..max_len-1 ([B, Hkv, max_len, hd]; the caller masks slots past each
        query's position). Does not change ``lengths``."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"k has batch {k.shape[0]}, cache has {self.batch_size}")
        if layer_idx >= self.k.shape[0]:
            raise ValueError(f"layer {layer_idx} is beyond this cache's {self.k.shape[0]} layers")
        if debug_checks() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond this cache's "
                             f"{self.max_len} slots")
        # buf[layer][b, :, positions[b, t]] <- k[b, :, t]  (advanced indices first: [B,T,H,hd])
        self.k[layer_idx][self._batch, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer_idx][self._batch, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, n) -> None:
        """Keep n more tokens per sequence (int, or int64 [B] on the cache's device)."""
        self.set_lengths(self.lengths + n)

    def set_lengths(self, lengths) -> None:
        """Roll back (or forward) to these per-sequence lengths: int, list, or int64 [B].
        Values given on the host are checked here; values on the device only under KC_DEBUG=1
        (reading them back would sync)."""
        on_host = not isinstance(lengths, torch.Tensor) or (
            lengths.device.type == "cpu" and self.lengths.device.type != "cpu")
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if (on_host or debug_checks()) and (lengths.min() < 0 or lengths.max() > self.max_len):
            raise ValueError(f"lengths must be in [0, {self.max_len}], got {lengths.tolist()}")
        self.lengths = lengths.to(self.lengths.device).expand(self.batch_size).clone()
