"""group_advantages (GRPO / Dr. GRPO / RLOO): the fastrlhf kernel vs the eager PyTorch code
trainers use (view -> mean/std -> repeat_interleave, as TRL's GRPOTrainer) and the reference.
Bandwidth: 8 bytes per score (read + write, fp32)."""

from __future__ import annotations

import sys

import torch

import fastrlhf

import _harness as H


def eager_grpo(scores: torch.Tensor, G: int, eps: float = 1e-6) -> torch.Tensor:
    """TRL-style: grouped mean/std, repeated back to one entry per sample."""
    grouped = scores.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)
    return (scores - mean) / (std + eps)


def eager_rloo(scores: torch.Tensor, G: int) -> torch.Tensor:
    grouped = scores.view(-1, G)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)
    return (grouped - baseline).reshape(-1)


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    shapes = [(64, 8)] if args.quick else [(4096, 16), (65536, 8), (1024, 256)]
    repeat = args.repeat or (2 if args.quick else 20)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    rows: list[H.Row] = []
    for n_groups, G in shapes:
        scores = torch.randn(n_groups * G, device=dev)
        cases = {
            "grpo": ({"normalize": "std"}, lambda: eager_grpo(scores, G)),
            "rloo": ({"normalize": "none", "leave_one_out": True}, lambda: eager_rloo(scores, G)),
        }
        for variant, (kw, eager) in cases.items():
            providers = {
                "kernel": lambda: fastrlhf.ops.group_advantages(scores, G, impl="kernel", **kw),
                "eager": eager,
                "reference": lambda: fastrlhf.ops.group_advantages(scores, G, impl="reference", **kw),
            }
            want = providers["reference"]()
            for name, fn in providers.items():
                err = (fn() - want).abs().max().item()
                if not err < 1e-3:
                    raise AssertionError(f"group_advantages {variant} provider {name} differs: {err}")
                t = H.time_fn(fn, dev, repeat=repeat)
                gbps = scores.numel() * 8 / t / 1e9
                rows.append(H.Row(f"group_advantages[{variant}]", f"{n_groups}x{G}", "fp32", name,
                                  t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "eager")
    return H.report("group_advantages", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "bytes_per_score": 8})


if __name__ == "__main__":
    main(sys.argv[1:])
