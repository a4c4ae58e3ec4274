"""whiten (masked advantage whitening): the fastrlhf kernel vs TRL's eager masked_whiten and the
reference. Bandwidth: 9 bytes per element (read x and mask once, write once: the one-pass ideal;
the kernel reads x three times, for the mean, the variance and the output)."""

from __future__ import annotations

import sys

import torch

import fastrlhf

import _harness as H


def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's masked_mean / masked_var (unbiased) / masked_whiten, as written there."""
    def masked_mean(v, m):
        return (v * m).sum() / m.sum()

    mean = masked_mean(values, mask)
    centered = values - mean
    variance = masked_mean(centered**2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    shapes = [(16, 128)] if args.quick else [(256, 1024), (4096, 512), (64, 16384)]
    repeat = args.repeat or (2 if args.quick else 20)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    rows: list[H.Row] = []
    for B, T in shapes:
        x = torch.randn(B, T, device=dev)
        lengths = torch.randint(T // 4, T + 1, (B,), device=dev)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        maskf = mask.float()
        providers = {
            "kernel": lambda: fastrlhf.ops.whiten(x, mask, impl="kernel"),
            "eager_trl": lambda: trl_masked_whiten(x, maskf),
            "reference": lambda: fastrlhf.ops.whiten(x, mask, impl="reference"),
        }
        want = providers["reference"]()
        for name, fn in providers.items():
            err = ((fn() - want) * maskf).abs().max().item()
            if not err < 1e-3:
                raise AssertionError(f"whiten provider {name} differs: {err}")
            t = H.time_fn(fn, dev, repeat=repeat)
            gbps = B * T * 9 / t / 1e9
            rows.append(H.Row("whiten", f"{B}x{T}", "fp32", name, t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "eager_trl")
    return H.report("whiten", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "bytes_per_element": 9})


if __name__ == "__main__":
    main(sys.argv[1:])
