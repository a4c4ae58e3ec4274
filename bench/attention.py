"""attention / decode_attention: the fastrlhf kernels vs F.scaled_dot_product_attention
(PyTorch's own flash / efficient kernels) and the eager math reference. Causal, B=4, H=8 (and
GQA Hkv=2), D=64 and 128, T = 256 / 1024 / 2048; forward and forward+backward; varlen with 50%
padding vs the padded call (with and without key_lengths / a key-padding mask); decode against
caches of 512..8192. GFLOP/s count valid-token FLOPs (causal: half the square), compared with a
same-size matmul measured in the same run; decode reports GB/s of K/V read against the measured
copy bandwidth.

SDPA providers (grouped K/V: Hkv < H):
  sdpa              F.scaled_dot_product_attention(..., enable_gqa=True): K/V as they are. The
                    baseline of every "vs sdpa" speedup.
  sdpa_packed_gqa   decode only: the H query heads packed as [B, Hkv, group * Tq, D], so one SDPA
                    call per kv head attends its cache, no K/V copy (what transformers'
                    integrations/sdpa_attention.py pack_gqa does for one query token when it does
                    not pass enable_gqa); the kernel's speedup over it is in the notes.
  sdpa_repeat_kv    grouped shapes only: K/V repeat_interleave'd to H heads inside the timed call,
                    as code without enable_gqa does.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastrlhf

import _harness as H


def sdpa(q, k, v, causal, attn_mask=None):
    """SDPA on grouped K/V as they are (enable_gqa); ``attn_mask``: boolean, True = attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                          enable_gqa=True)


def sdpa_repeat_kv(q, k, v, causal):
    """SDPA after copying each kv head ``group`` times (repeat_interleave), inside the call."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_packed_gqa(q, k_cache, v_cache):
    """Decode against full caches without repeating K/V: query head h = j * group + g attends kv
    head j, so q [B, H, Tq, D] reshaped to [B, Hkv, group * Tq, D] puts every query of kv head j in
    one SDPA call on K/V [B, Hkv, L, D]. No mask: every query attends the whole cache (Tq = 1)."""
    B, H, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, (H // Hkv) * Tq, D), k_cache, v_cache)
    return out.reshape(B, H, Tq, D)


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    repeat = args.repeat or (2 if args.quick else 5)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    mm = H.matmul_gflops(dev, quick=args.quick)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    dn = "fp32" if dtype == torch.float32 else "bf16"
    rows: list[H.Row] = []
    B, Hq = (2, 2) if args.quick else (4, 8)
    Ts = [64] if args.quick else [256, 1024, 2048]
    Ds = [64] if args.quick else [64, 128]
    for D in Ds:
        for Hkv in ([Hq, 1] if args.quick else [Hq, 2]):
            for T in Ts:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(B, Hq, T, D, generator=g).to(dev, dtype).requires_grad_()
                k = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_()
                v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_()
                flops_fwd = 4 * B * Hq * D * T * (T + 1) / 2  # causal: valid pairs only
                providers = {
                    "kernel": lambda: fastrlhf.ops.attention(q, k, v, causal=True),
                    "sdpa": lambda: sdpa(q, k, v, True),
                }
                if Hkv < Hq:
                    providers["sdpa_repeat_kv"] = lambda: sdpa_repeat_kv(q, k, v, True)
                if T <= 1024:
                    providers["reference"] = lambda: fastrlhf.ops.attention(q, k, v, causal=True, impl="reference")
                want = sdpa(q.detach(), k.detach(), v.detach(), True)
                grad = torch.randn_like(want)
                for name, f in providers.items():
                    def fwd():
                        with torch.no_grad():
                            return f()

                    def full():
                        return torch.autograd.grad(f(), (q, k, v), grad)

                    err = (fwd().float() - want.float()).abs().max().item()
                    if not err < (1e-3 if dtype == torch.float32 else 3e-2):
                        raise AssertionError(f"attention provider {name} differs from SDPA by {err}")
                    slow = name in ("reference", "sdpa_repeat_kv")
                    t_f = H.time_fn(fwd, dev, repeat=2 if slow else repeat, max_time=20)
                    t_b = H.time_fn(full, dev, repeat=2 if slow else repeat, max_time=20)
                    shape = f"B{B} H{Hq}/{Hkv} T{T} D{D}"
                    for op, t, fl in (("attention fwd", t_f, flops_fwd), ("attention fwd+bwd", t_b, 3.5 * flops_fwd)):
                        gf = fl / t / 1e9
                        rows.append(H.Row(op, shape, dn, name, t * 1e3, extra={"gflops": gf, "frac_matmul": gf / mm}))
    # varlen with 50% padding vs the padded call on the same (padded) batch
    T, D, Hkv = (64, 64, Hq) if args.quick else (1024, 64, Hq)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths = (lengths.float() * (0.5 * B * T / lengths.sum().item())).clamp(1, T).long()  # ~50% padding
    q = torch.randn(B, Hq, T, D, generator=g).to(dev, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype)
    pack = lambda x: torch.cat([x[b, :, : lengths[b]].transpose(0, 1) for b in range(B)])  # noqa: E731
    qp, kp, vp = pack(q), pack(k), pack(v)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(dev)
    # the padded call's key padding as SDPA takes it: a boolean [B, 1, T, T] mask, causal & key < length
    pos = torch.arange(T, device=dev)
    key_mask = (pos[None, :] <= pos[:, None])[None, None] & (pos < lengths.to(dev)[:, None])[:, None, None, :]
    varlen = {"kernel varlen": lambda: fastrlhf.ops.attention(qp, kp, vp, causal=True, cu_seqlens=cu),
              "kernel padded": lambda: fastrlhf.ops.attention(q, k, v, causal=True, key_lengths=lengths.to(dev)),
              "kernel padded, no key_lengths": lambda: fastrlhf.ops.attention(q, k, v, causal=True),
              "sdpa padded, key mask": lambda: sdpa(q, k, v, True, attn_mask=key_mask),
              "sdpa padded": lambda: sdpa(q, k, v, True)}
    # right padding + causal: a valid query row attends valid keys only, so every provider must
    # give the masked SDPA's output there (padding rows differ: nothing uses them)
    want = sdpa(q, k, v, True, attn_mask=key_mask)
    for name, f in varlen.items():
        got = f()
        if name == "kernel varlen":
            got = torch.stack([F.pad(x.transpose(0, 1), (0, 0, 0, T - x.shape[0]))
                               for x in got.split(lengths.tolist())])
        err = max((got[b, :, : lengths[b]].float() - want[b, :, : lengths[b]].float()).abs().max().item()
                  for b in range(B))
        if not err < (1e-3 if dtype == torch.float32 else 3e-2):
            raise AssertionError(f"attention varlen provider {name} differs from masked SDPA by {err}")
        with torch.no_grad():
            t = H.time_fn(f, dev, repeat=repeat)
        rows.append(H.Row("attention varlen 50% pad", f"B{B} T{T} D{D}", dn, name, t * 1e3))
    # decode: one new token against caches of growing length
    for L in ([128] if args.quick else [512, 2048, 8192]):
        Bd, Hd, Hkvd, Dd = (2, 4, 2, 64) if args.quick else (8, 32, 8, 128)
        qd = torch.randn(Bd, Hd, 1, Dd, device=dev, dtype=dtype)
        kc = torch.randn(Bd, Hkvd, L, Dd, device=dev, dtype=dtype)
        vc = torch.randn(Bd, Hkvd, L, Dd, device=dev, dtype=dtype)
        lens = torch.full((Bd,), L, device=dev, dtype=torch.long)
        kv_bytes = 2 * kc.numel() * kc.element_size()
        want = fastrlhf.ops.decode_attention(qd, kc, vc, lens, impl="reference").float()
        decode = {"kernel": lambda: fastrlhf.ops.decode_attention(qd, kc, vc, lens),
                  "sdpa": lambda: sdpa(qd, kc, vc, False),
                  "sdpa_packed_gqa": lambda: sdpa_packed_gqa(qd, kc, vc),
                  "sdpa_repeat_kv": lambda: sdpa_repeat_kv(qd, kc, vc, False)}
        for name, f in decode.items():
            err = (f().float() - want).abs().max().item()
            if not err < (1e-3 if dtype == torch.float32 else 3e-2):
                raise AssertionError(f"decode_attention provider {name} differs from the reference by {err}")
            slow = name == "sdpa_repeat_kv"
            t = H.time_fn(f, dev, repeat=2 if slow else repeat, max_time=5.0 if slow else 10.0)
            gbps = kv_bytes / t / 1e9
            rows.append(H.Row("decode_attention", f"B{Bd} H{Hd}/{Hkvd} L{L} D{Dd}", dn, name, t * 1e3, gbps, gbps / bw))
    H.add_speedups(rows, "sdpa", also=("sdpa_packed_gqa",))
    return H.report("attention", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "matmul_GFLOPs": round(mm, 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
