"""sample: the fused fastrlhf sampler vs the sort-based PyTorch path (Hugging Face's logits
processors: penalties by gather/scatter, topk, sort + softmax + cumsum for top-p, softmax for
min-p, then softmax + multinomial) and the reference. Reports time and passes over the logits
(time x measured copy bandwidth / bytes of the logits)."""

from __future__ import annotations

import sys

import torch

import fastrlhf
from fastrlhf.ops import reference

import _harness as H


def sort_based(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
               token_history=None, **_):
    x = logits.float()
    if token_history is not None and repetition_penalty != 1.0:
        score = torch.gather(x, 1, token_history)
        score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
        x = x.scatter(1, token_history, score)
    x = x / temperature
    if top_k:
        kth = torch.topk(x, top_k).values[:, -1:]
        x = x.masked_fill(x < kth, -float("inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False
        x = x.scatter(1, idx, sorted_x.masked_fill(remove, -float("inf")))
    if min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -float("inf"))
    return torch.multinomial(x.softmax(-1), 1).squeeze(1)


CONFIGS = {
    "temperature": dict(temperature=0.8),
    "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min_p": dict(temperature=0.8, min_p=0.05),
    "penalties": dict(temperature=0.8, repetition_penalty=1.2),
}


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    if args.quick:
        shapes = [(4, 1000)]
    elif dev == "cpu":
        shapes = [(1, 32000), (16, 32000), (64, 32000), (256, 32000), (1, 128000), (16, 128000), (64, 128000)]
    else:
        shapes = [(1, 32000), (64, 32000), (256, 32000), (16, 128000), (128, 128000), (256, 128000)]
    repeat = args.repeat or (2 if args.quick else 10)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    rows: list[H.Row] = []
    for B, V in shapes:
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(B, V, generator=g) * 3).to(dev)
        history = torch.randint(0, V, (B, 256), generator=g).to(dev)
        for cname, cfg in CONFIGS.items():
            kw = dict(cfg, token_history=history if "repetition_penalty" in cfg else None)
            q = reference.processed_distribution(logits, **kw) if B * V <= 64 * 32000 else None
            providers = {
                "kernel": lambda: fastrlhf.ops.sample(logits, seed=1, validate=False, impl="kernel", **kw).tokens,
                "sort_based": lambda: sort_based(logits, **kw),
            }
            if B * V <= 16 * 32000:
                providers["reference"] = lambda: reference.sample(logits, seed=1, **kw)[0]
            for name, fn in providers.items():
                tok = fn()
                if q is not None and not bool((q.gather(1, tok[:, None].to(q.device)) > 0).all()):
                    raise AssertionError(f"sample provider {name} drew a token outside the support ({cname})")
                t = H.time_fn(fn, dev, repeat=repeat if name != "reference" else 2, max_time=5.0)
                passes = t * bw * 1e9 / (logits.numel() * 4)
                rows.append(H.Row(f"sample[{cname}]", f"{B}x{V}", "fp32", name, t * 1e3,
                                  extra={"passes_over_logits": passes}))
    H.add_speedups(rows, "sort_based")
    for r in rows:
        r.gbps = None
    return H.report("sample", rows, args, {"copy_bandwidth_GBps": round(bw, 1),
                                           "note": "passes = time x copy bandwidth / logits bytes"})


if __name__ == "__main__":
    main(sys.argv[1:])
