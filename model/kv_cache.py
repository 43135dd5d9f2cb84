"""The KV cache: an explicit object owned by the caller (engine, sampler) and passed into forward.

Legend: L layers, B batch rows, K kv heads, S max cached length, D head_dim.
Keys are stored after QK-norm and rotary, so a cached prefix is reused exactly as computed.
Rows may be left-padded (guidance batches a conditional and an unconditional prompt of different
lengths): `key_valid` then records which cached positions are real, and `next_position` gives each
row's next rotary position.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        if max_length <= 0 or max_length > config.max_position_embeddings:
            raise ValueError(f"max_length: must be in [1, {config.max_position_embeddings}] "
                             f"(max_position_embeddings), got {max_length}")
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)  # (L, B, K, S, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored, the same for every row
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.key_valid: torch.Tensor | None = None  # (B, S) bool once a padded batch was written

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_length:
            raise ValueError(f"input_ids: {T} new tokens do not fit the cache ({self.length} of "
                             f"{self.max_length} used)")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) after the cached prefix; return the keys and values so far (B, K, S', D)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int, valid: torch.Tensor | None = None) -> None:
        """Commit T new tokens (called once per forward, after all layers). valid: (B, T) bool or None."""
        if valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.max_length, dtype=torch.bool, device=self.k.device)
        if self.key_valid is not None:
            self.key_valid[:, self.length:self.length + T] = True if valid is None else valid
        self.next_position += T if valid is None else valid.sum(1)
        self.length += T

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (undo, re-roll, branch)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length: must be in [0, {self.length}], got {length}")
        if self.key_valid is not None:
            drop = (~self.key_valid[:, length:self.length]).sum(1)
            self.next_position -= (self.length - length) - drop
        else:
            self.next_position -= self.length - length
        self.length = length

    def clone(self) -> "KVCache":
        new = object.__new__(KVCache)
        new.k, new.v = self.k.clone(), self.v.clone()
        new.length, new.next_position = self.length, self.next_position.clone()
        new.key_valid = None if self.key_valid is None else self.key_valid.clone()
        return new
