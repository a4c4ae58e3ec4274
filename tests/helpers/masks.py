"""Random ``[B, T]`` validity masks of every pattern the ops must handle."""

from __future__ import annotations

import torch

# ---- masks --------------------------------------------------------------------------------

MASK_KINDS = ["none", "left", "right", "holes", "all_masked_rows", "ragged"]


def make_mask(kind: str, B: int, T: int, *, generator: torch.Generator | None = None,
              device="cpu") -> torch.Tensor | None:
    """Random ``[B, T]`` bool validity mask of one kind (None for ``"none"``).

    left: each row valid on a random-length suffix (left padding, lengths 0..T);
    right: valid on a random-length prefix (right padding); holes: each step valid with p=0.7;
    all_masked_rows: holes, with every other row (and at least row 0) entirely masked;
    ragged: one valid contiguous span per row with random start and length (padding on both
    sides, empty spans included).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(1234)
    if kind == "none":
        return None
    t = torch.arange(T)[None, :]  # (1, T)
    if kind in ("left", "right"):
        lengths = torch.randint(0, T + 1, (B, 1), generator=g)
        if B > 1:  # make sure both extremes appear
            lengths[0, 0], lengths[-1, 0] = T, 0
        m = t >= (T - lengths) if kind == "left" else t < lengths
    elif kind == "holes":
        m = torch.rand(B, T, generator=g) < 0.7
    elif kind == "all_masked_rows":
        m = torch.rand(B, T, generator=g) < 0.7
        m[::2] = False
    elif kind == "ragged":
        start = torch.randint(0, T + 1, (B, 1), generator=g)
        length = (torch.rand(B, 1, generator=g) * (T + 1 - start)).long()
        m = (t >= start) & (t < start + length)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return m.to(device)
