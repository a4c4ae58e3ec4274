"""policy_loss + value_loss (+ KL in the loss, entropy bonus): the fused fastrlhf kernels vs the
eager composition popular trainers write (fastrlhf.ops.reference.losses is exactly that: ratio,
clamps, max, masked aggregation, stats with tensor ops) and torch.compile of it. Forward+backward
of the PPO objective at [B, T] tokens."""

from __future__ import annotations

import sys

import torch

import fastrlhf
from fastrlhf.ops import reference

import _harness as H


def make(B, T, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) * 0.1 - 2).to(dev).requires_grad_()
    old = (lp.detach() + torch.randn(B, T, generator=g).to(dev) * 0.1)
    ref = (lp.detach() + torch.randn(B, T, generator=g).to(dev) * 0.1)
    adv = torch.randn(B, T, generator=g).to(dev)
    ent = torch.rand(B, T, generator=g).to(dev).requires_grad_()
    v = torch.randn(B, T, generator=g).to(dev).requires_grad_()
    old_v = v.detach() + torch.randn(B, T, generator=g).to(dev) * 0.3
    ret = torch.randn(B, T, generator=g).to(dev)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)
    return lp, old, ref, adv, ent, v, old_v, ret, mask


KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def kernel_objective(lp, old, ref, adv, ent, v, old_v, ret, mask):
    pl, ps = fastrlhf.ops.policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, impl="kernel",
                                      validate=False, **KW)  # the eager baseline checks nothing either
    vl, vs = fastrlhf.ops.value_loss(v, old_v, ret, mask, clip=0.2, impl="kernel")
    return pl + 0.5 * vl, ps, vs


def eager_objective(lp, old, ref, adv, ent, v, old_v, ret, mask):
    pl, ps = reference.policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **KW)
    vl, vs = reference.value_loss(v, old_v, ret, mask, clip=0.2)
    return pl + 0.5 * vl, ps, vs


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    shapes = [(8, 64)] if args.quick else [(512, 1024), (64, 4096)]
    repeat = args.repeat or (2 if args.quick else 20)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    rows: list[H.Row] = []
    providers = {"kernel": kernel_objective, "eager": eager_objective}
    if not args.quick:
        providers["compile"] = torch.compile(eager_objective)
    for B, T in shapes:
        inputs = make(B, T, dev)
        leaves = (inputs[0], inputs[4], inputs[5])
        want = eager_objective(*inputs)[0].item()
        for name, f in providers.items():
            def fwd():
                with torch.no_grad():
                    return f(*inputs)[0]

            def full():
                loss = f(*inputs)[0]
                torch.autograd.grad(loss, leaves)
                return loss

            try:
                got = fwd().item()
            except Exception as exc:  # torch.compile without a working toolchain
                print(f"   provider {name} skipped: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                raise AssertionError(f"losses provider {name}: {got} vs {want}")
            t_f = H.time_fn(fwd, dev, repeat=repeat)
            t_full = H.time_fn(full, dev, repeat=repeat)
            # bytes the fused pass must touch: fwd reads 8 [B,T] fp32 tensors + mask; bwd reads 7
            # and writes 3
            gbps = B * T * (4 * 18 + 2) / t_full / 1e9
            rows.append(H.Row("ppo policy+value loss fwd", f"{B}x{T}", "fp32", name, t_f * 1e3))
            rows.append(H.Row("ppo policy+value loss fwd+bwd", f"{B}x{T}", "fp32", name, t_full * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "eager")
    return H.report("losses", rows, args, {"copy_bandwidth_GBps": round(bw, 1), **KW})


if __name__ == "__main__":
    main(sys.argv[1:])
