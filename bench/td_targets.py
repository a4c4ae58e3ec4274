"""td_targets (Q-learning / SARSA targets) and q_update: the fastrlhf kernels vs the eager
PyTorch code (max / gather, where; gather / scatter) and the references.
Bandwidth: td_targets reads next_q (4A bytes), reward, done and writes the target per row;
q_update reads and writes q (8A bytes) per row."""

from __future__ import annotations

import sys

import torch

import fastrlhf

import _harness as H


def eager_q_learning(rewards, next_q, dones, gamma: float):
    return rewards + gamma * (~dones).float() * next_q.max(dim=-1).values


def eager_q_update(q, actions, targets, alpha: float):
    qa = q.gather(-1, actions[:, None])
    return q.scatter(-1, actions[:, None], qa + alpha * (targets[:, None] - qa))


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    shapes = [(256, 6)] if args.quick else [(65536, 18), (131072, 64), (4096, 4096)]
    repeat = args.repeat or (2 if args.quick else 20)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    gamma, alpha = 0.99, 0.1
    rows: list[H.Row] = []
    for N, A in shapes:
        q = torch.randn(N, A, device=dev)
        r = torch.randn(N, device=dev)
        d = torch.rand(N, device=dev) < 0.05
        act = torch.randint(0, A, (N,), device=dev)
        td = {
            "kernel": lambda: fastrlhf.ops.td_targets(r, q, d, gamma=gamma, impl="kernel"),
            "eager": lambda: eager_q_learning(r, q, d, gamma),
            "reference": lambda: fastrlhf.ops.td_targets(r, q, d, gamma=gamma, impl="reference"),
        }
        qu = {
            "kernel": lambda: fastrlhf.ops.q_update(q, act, r, alpha=alpha, impl="kernel"),
            "eager": lambda: eager_q_update(q, act, r, alpha),
            "reference": lambda: fastrlhf.ops.q_update(q, act, r, alpha=alpha, impl="reference"),
        }
        for op, providers, nbytes in (("td_targets", td, N * (4 * A + 9)), ("q_update", qu, N * (8 * A + 12))):
            want = providers["reference"]()
            for name, fn in providers.items():
                err = (fn() - want).abs().max().item()
                if not err < 1e-4:
                    raise AssertionError(f"{op} provider {name} differs: {err}")
                t = H.time_fn(fn, dev, repeat=repeat)
                gbps = nbytes / t / 1e9
                rows.append(H.Row(op, f"{N}x{A}", "fp32", name, t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "eager")
    return H.report("td_targets", rows, args, {"copy_bandwidth_GBps": round(bw, 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
