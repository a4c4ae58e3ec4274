"""preference_loss (DPO sigmoid with label smoothing, and the reward-model Bradley-Terry loss):
the fused fastrlhf kernel vs the eager code TRL writes (logits = beta * (log-ratio difference),
-logsigmoid with label smoothing, reward stats as separate tensor ops), forward+backward over B
pairs. The op is tiny next to the forward passes that produce its inputs; the bench shows it
costs nothing and that its memory traffic is one pass."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastrlhf
from fastrlhf.ops import reference

import _harness as H

BETA, EPS = 0.1, 0.1


def make(B, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (-torch.rand(B, generator=g) * 50).to(dev).requires_grad_()
    r = (-torch.rand(B, generator=g) * 50).to(dev).requires_grad_()
    rc = c.detach() + torch.randn(B, generator=g).to(dev)
    rr = r.detach() + torch.randn(B, generator=g).to(dev)
    return c, r, rc, rr


def kernel(c, r, rc, rr):
    loss, st = fastrlhf.ops.preference_loss(c, r, rc, rr, beta=BETA, label_smoothing=EPS, impl="kernel")
    return loss, st["accuracy"]


def eager_trl(c, r, rc, rr):
    logits = (c - r) - (rc - rr)
    loss = (-F.logsigmoid(BETA * logits) * (1 - EPS) - F.logsigmoid(-BETA * logits) * EPS).mean()
    chosen_rewards, rejected_rewards = BETA * (c - rc).detach(), BETA * (r - rr).detach()
    return loss, (chosen_rewards > rejected_rewards).float().mean()


def reference_op(c, r, rc, rr):
    loss, st = reference.preference_loss(c, r, rc, rr, beta=BETA, label_smoothing=EPS)
    return loss, st["accuracy"]


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    sizes = [64] if args.quick else [4096, 1 << 20]
    repeat = args.repeat or (2 if args.quick else 30)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    providers = {"kernel": kernel, "eager_trl": eager_trl, "reference": reference_op}
    rows: list[H.Row] = []
    for B in sizes:
        inputs = make(B, dev)
        want = eager_trl(*inputs)[0].item()
        for name, f in providers.items():
            got = f(*inputs)[0].item()
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                raise AssertionError(f"preference_loss provider {name}: {got} vs {want}")

            def full():
                loss = f(*inputs)[0]
                torch.autograd.grad(loss, inputs[:2])
                return loss

            t = H.time_fn(full, dev, repeat=repeat)
            gbps = B * 4 * (4 + 4 + 2) / t / 1e9  # fwd reads 4, bwd reads 4 and writes 2 [B] fp32 tensors
            rows.append(H.Row("preference_loss fwd+bwd", f"B={B}", "fp32", name, t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "eager_trl")
    return H.report("preference_loss", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "beta": BETA,
                                                   "label_smoothing": EPS})


if __name__ == "__main__":
    main(sys.argv[1:])
