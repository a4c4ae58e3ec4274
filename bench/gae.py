"""GAE / discounted returns: the fastrlhf kernel vs the PyTorch formulations trainers use.

Providers, one process, one machine:
  kernel       fastrlhf.ops.gae (C++/CUDA)
  loop         the per-timestep reverse loop of popular RLHF trainers (verl-style masked GAE:
               ~11 tensor ops per time step)
  vectorized   the best pure-PyTorch formulation we know: a log-depth (Hillis-Steele) scan of
               the per-step affine maps, ~12 elementwise ops x log2(T) rounds
  reference    fastrlhf.ops.reference.gae (the test oracle; a loop over T)
Masks are right-padded with random lengths (as RLHF responses are). Bandwidth: ~18 bytes per
token (rewards, values, advantages, returns: 4 B each in fp32; mask 1 B), against the copy
bandwidth this script measures at start-up.
"""

from __future__ import annotations

import sys

import torch

import fastrlhf
from fastrlhf.ops import reference

import _harness as H


def loop_gae(rewards, values, mask, gamma: float, lam: float):
    """verl's compute_gae_advantage_return (per-timestep loop, masked)."""
    B, T = rewards.shape
    maskf = mask.to(rewards.dtype)
    nextvalues = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    lastgaelam = torch.zeros_like(nextvalues)
    adv_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * maskf[:, t] + (1 - maskf[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * maskf[:, t] + (1 - maskf[:, t]) * lastgaelam
        adv_reversed.append(lastgaelam)
    advantages = torch.stack(adv_reversed[::-1], dim=1)
    return advantages * maskf, (advantages + values) * maskf


def vectorized_gae(rewards, values, mask, gamma: float, lam: float):
    """Log-depth scan of the affine step maps (see csrc/kernels/gae.h), pure tensor ops."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    # per-step map on the state (adv, nv): adv' = c + ma*adv + mv*nv ; nv' = p + q*nv
    c = (rewards - values) * m
    ma = gamma * lam * m + (1 - m)
    mv = gamma * m
    p = values * m
    q = 1 - m
    s = 1
    while s < T:  # maps[t] <- maps[t] o maps[t+s]
        c2, ma2, mv2, p2, q2 = (torch.nn.functional.pad(x[:, s:], (0, s), value=v)
                                for x, v in ((c, 0.0), (ma, 1.0), (mv, 0.0), (p, 0.0), (q, 1.0)))
        c, ma, mv, p, q = c + ma * c2 + mv * p2, ma * ma2, ma * mv2 + mv * q2, p + q * p2, q * q2
        s *= 2
    adv = c * m  # initial state (0, 0): adv = c
    return adv, (adv + values) * m


def make_inputs(B: int, T: int, device: str, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    values = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    lengths = torch.randint(T // 4 + 1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return rewards, values, mask


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    shapes = [(16, 64), (2, 512)] if args.quick else [(256, 1024), (8, 16384), (4096, 512)]
    repeat = args.repeat or (2 if args.quick else 10)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    gamma, lam = 0.99, 0.95
    rows: list[H.Row] = []
    for B, T in shapes:
        r, v, m = make_inputs(B, T, dev)
        # sanity: every provider computes the same advantages on valid tokens
        want = reference.gae(r.double(), v.double(), m, gamma=gamma, lam=lam)[0].float()
        providers = {
            "kernel": lambda: fastrlhf.ops.gae(r, v, m, gamma=gamma, lam=lam, impl="kernel"),
            "loop": lambda: loop_gae(r, v, m, gamma, lam),
            "vectorized": lambda: vectorized_gae(r, v, m, gamma, lam),
            "reference": lambda: fastrlhf.ops.gae(r, v, m, gamma=gamma, lam=lam, impl="reference"),
        }
        bytes_moved = B * T * (4 * 4 + 1)
        for name, fn in providers.items():
            got = fn()[0]
            err = (got - want).abs().max().item()
            if not err < 1e-3 * max(1.0, want.abs().max().item()):
                raise AssertionError(f"gae provider {name} disagrees with the reference: {err}")
            slow = name in ("loop", "reference")
            t = H.time_fn(fn, dev, repeat=3 if slow else repeat, max_time=5.0 if slow else 10.0)
            gbps = bytes_moved / t / 1e9
            rows.append(H.Row("gae", f"{B}x{T}", "fp32", name, t * 1e3, gbps, gbps / bw))
        # discounted returns: kernel vs reference
        dr = {
            "kernel": lambda: fastrlhf.ops.discounted_returns(r, m, gamma=gamma, impl="kernel"),
            "loop": lambda: loop_gae(r, torch.zeros_like(r), m, gamma, 1.0),
        }
        for name, fn in dr.items():
            t = H.time_fn(fn, dev, repeat=3 if name == "loop" else repeat, max_time=5.0)
            gbps = B * T * (4 * 2 + 1) / t / 1e9
            rows.append(H.Row("discounted_returns", f"{B}x{T}", "fp32", name, t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "loop")
    return H.report("gae", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "gamma": gamma, "lam": lam,
                                         "bytes_per_token": 17})


if __name__ == "__main__":
    main(sys.argv[1:])
