"""The preallocated key/value cache that generation decodes against."""

from __future__ import annotations

import torch

from fastrlhf.models.config import CausalLMConfig


class KVCache:
    """Preallocated keys and values of every layer, ``[B, Hkv, max_length, D]`` each, and the
    number of valid positions per row ``lengths [B]`` (int64). Rows are stored unpadded from
    position 0 (no left padding inside the cache), so ``decode_attention`` reads exactly
    ``lengths[b]`` keys for row b.

    Args:
        config: the model's architecture (layers, kv heads, head dim).
        batch_size: rows B.
        max_length: positions per row (prompt + new tokens).
        dtype: storage dtype (the model's).
        device: where the cache lives (the model's device).
    """

    def __init__(self, config: CausalLMConfig, batch_size: int, max_length: int, *, dtype=torch.float32,
                 device=None):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (an index tensor), in that order: finished rows stop costing compute.

        Increasing ``rows`` (what generation passes: the rows still running) compact the cache in
        place: only the rows that move are copied, and only their first ``max(lengths)``
        positions; the cache becomes a view of the first ``len(rows)`` rows of its storage (no
        new allocation). Other orders gather into new tensors.

        Args:
            rows: ``[n]`` int64 indices of the rows to keep.
        """
        rows = rows.to(self.lengths.device)
        n = rows.numel()
        lengths = self.lengths.index_select(0, rows)
        if n > 1 and not bool((rows[1:] > rows[:-1]).all()):
            self.k = [k.index_select(0, rows) for k in self.k]
            self.v = [v.index_select(0, rows) for v in self.v]
        else:
            # row i moves from rows[i] >= i: a gather of the moved rows, then a write to [0, n)
            moved = (rows != torch.arange(n, device=rows.device)).nonzero().squeeze(1)
            used = int(lengths.max()) if n else 0
            if moved.numel() and used:
                src = rows.index_select(0, moved)
                for t in self.k + self.v:
                    t[moved, :, :used] = t[src, :, :used]
            self.k = [k[:n] for k in self.k]
            self.v = [v[:n] for v in self.v]
        self.lengths = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
