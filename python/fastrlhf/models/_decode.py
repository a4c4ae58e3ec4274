"""The CPU decode fast path of :class:`~fastrlhf.models.CausalLM` (private).

Decode steps multiply a handful of rows by every weight matrix, where MKL's sgemm is much faster
with the large dimension first, and where fewer, larger matmuls pay: :func:`linear` computes
``(W @ x^T)^T`` for decode-sized fp32 inputs on the CPU, and :func:`packed_decode_weights`
concatenates q/k/v and gate/up weights for the duration of a generate call. Same math as the
plain path; only rounding differs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

DECODE_ROWS = 64  # at most this many rows: a decode-sized matmul (linear(), packed decode weights)


def decode_sized(x: torch.Tensor) -> bool:
    """``x [..., C]`` has at most :data:`DECODE_ROWS` rows."""
    return x.numel() <= DECODE_ROWS * x.shape[-1]


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``. For a plain fp32 ``nn.Linear`` on the CPU with decode-sized ``x``, it
    computes ``(W @ x^T)^T`` instead: MKL's sgemm is much faster with the large dimension first.
    Same math; only rounding differs."""
    if type(layer) is nn.Linear and x.device.type == "cpu" and x.dtype == torch.float32 and decode_sized(x):
        y = (layer.weight @ x.reshape(-1, x.shape[-1]).t()).t()  # (rows, out), a transposed view
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return layer(x)


def pack_linears(*layers: nn.Module) -> nn.Linear | None:
    """One ``nn.Linear`` whose output is the concatenation of ``layers``' outputs (a copy of their
    weights, no grad), or None when any of them is not a plain ``nn.Linear`` (e.g. LoRA)."""
    if not all(type(m) is nn.Linear for m in layers):
        return None
    w = torch.cat([m.weight.detach() for m in layers])
    # built on the meta device: nn.Linear's random init of a weight replaced right away is wasted work
    packed = nn.Linear(w.shape[1], w.shape[0], bias=layers[0].bias is not None, device="meta", dtype=w.dtype)
    packed.weight = nn.Parameter(w, requires_grad=False)
    if packed.bias is not None:
        packed.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    return packed


@contextmanager
def packed_decode_weights(layers, device: torch.device):
    """Within the block, each decoder layer's ``self_attn.packed_qkv`` and ``mlp.packed_gate_up``
    hold concatenated copies of its q/k/v and gate/up weights (CPU only; built on entry from the
    current weights, freed on exit)."""
    use = device.type == "cpu"
    for layer in layers if use else ():
        a, m = layer.self_attn, layer.mlp
        a.packed_qkv = pack_linears(a.q_proj, a.k_proj, a.v_proj)
        m.packed_gate_up = pack_linears(m.gate_proj, m.up_proj)
    try:
        yield
    finally:
        for layer in layers:
            layer.self_attn.packed_qkv = None
            layer.mlp.packed_gate_up = None
