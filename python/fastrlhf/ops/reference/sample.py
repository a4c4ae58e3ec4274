"""Reference sampling: the processed distribution written with sort / cumsum (the way Hugging
Face's logits processors do it), in fp64, and a draw with torch.multinomial. The oracle for the
exact distribution the kernel must sample from (csrc/kernels/sample.h)."""

from __future__ import annotations

import torch


def _rows(v, B, dtype, device):
    """Scalar or [B] parameter -> [B] tensor."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype)
    return torch.full((B,), v, dtype=dtype, device=device)


def processed_distribution(
    logits: torch.Tensor,  # [B, V]
    *,
    temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, epsilon=0.0,
    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
    token_history: torch.Tensor | None = None,  # [B, L], -1 padding
) -> torch.Tensor:
    """-> q [B, V] (fp64): the distribution sample() draws from."""
    B, V = logits.shape
    dev = logits.device
    f64 = torch.float64
    x = logits.to(f64)
    T = _rows(temperature, B, f64, dev)
    k = _rows(top_k, B, torch.int64, dev)
    p = _rows(top_p, B, f64, dev)
    mp = _rows(min_p, B, f64, dev)
    eps = _rows(epsilon, B, f64, dev)
    if token_history is not None:
        counts = torch.zeros(B, V + 1, dtype=f64, device=dev)
        ids = torch.where(token_history < 0, V, token_history)  # padding -> a dropped column
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=f64))
        counts = counts[:, :V]
        seen = counts > 0
        rp = _rows(repetition_penalty, B, f64, dev)[:, None]
        x = torch.where(seen, torch.where(x < 0, x * rp, x / rp), x)
        x = x - _rows(presence_penalty, B, f64, dev)[:, None] * seen
        x = x - _rows(frequency_penalty, B, f64, dev)[:, None] * counts
    q = torch.empty(B, V, dtype=f64, device=dev)
    for b in range(B):
        if T[b] <= 0 or k[b] == 1:  # greedy: the first argmax
            filt = torch.zeros(V, dtype=f64, device=dev)
            filt[int(torch.argmax(x[b]))] = 1.0
        else:
            z = x[b] / T[b]
            e = torch.exp(z - z.max())
            keep = torch.ones(V, dtype=torch.bool, device=dev)
            if 0 < k[b] < V:
                kth = torch.topk(e, int(k[b])).values[-1]
                keep &= e >= kth
            if p[b] < 1:
                s = torch.sort(torch.where(keep, e, 0.0), descending=True).values
                csum = torch.cumsum(s, 0)
                target = p[b] * csum[-1]
                idx = int(torch.searchsorted(csum, target))  # first index with csum >= target
                keep &= e >= s[min(idx, V - 1)]
            keep &= e >= mp[b]
            filt = torch.where(keep, e, 0.0)
            filt = filt / filt.sum()
        q[b] = (1 - eps[b]) * filt + eps[b] / V
    return q


def sample(logits, *, seed: int = 0, offset: int = 0, row_ids=None, **params):
    """-> (tokens [B], logprobs [B], raw_logprobs [B]) drawn with torch.multinomial from
    processed_distribution (a different random stream than the kernel's). With ``row_ids``, each
    row draws from its own generator keyed by (seed, offset, row id)."""
    q = processed_distribution(logits, **params)
    if row_ids is None:
        g = torch.Generator(device=logits.device).manual_seed((seed * 1_000_003 + offset) % (2**63))
        tokens = torch.multinomial(q, 1, generator=g).squeeze(1)
    else:
        tokens = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
        for b, r in enumerate(row_ids.tolist()):
            g = torch.Generator(device=logits.device).manual_seed(((seed * 1_000_003 + offset) * 7_919 + r) % (2**63))
            tokens[b] = torch.multinomial(q[b], 1, generator=g)[0]
    logprobs = torch.log(q.gather(1, tokens[:, None]).squeeze(1)).float()
    raw = torch.log_softmax(logits.to(torch.float64), -1).gather(1, tokens[:, None]).squeeze(1).float()
    return tokens, logprobs, raw
