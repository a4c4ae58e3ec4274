"""token_logprobs / linear_token_logprobs: the fused fastrlhf kernels vs the eager PyTorch
composition trainers use (fp32 log_softmax + gather; linear -> log_softmax -> gather),
torch.compile of those compositions, and the reference (token_logprobs). Time forward, backward and both
(the LM-head providers round robin: the machine's drift hits all of them alike), and
peak extra memory (``mem_x`` = peak / size of the [N, V] logits in their dtype, the new .grad
buffers included; linear_token_logprobs also without its gradient outputs for hidden and
weight, which every provider allocates: 0.28x the logits at the default shape). linear_token_loss:
the LM head with a token-weighted loss known up front, fwd+bwd, vs linear_token_logprobs + the
loss and the eager composition + the loss.
Bandwidth for token_logprobs fwd+bwd: the logits are read twice and dlogits written once; the
kernel and eager rows also give it as a fraction of a copy timed right after each run (median of
pairs: robust to the machine's drift, unlike %bw against the run's ceilings)."""

from __future__ import annotations

import sys

import torch

import fastrlhf

import _harness as H


def eager_logprobs(logits, tokens):
    """What TRL/OpenRLHF do: log_softmax in fp32, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def eager_linear_logprobs(hidden, weight, tokens):
    return eager_logprobs(hidden @ weight.T, tokens)


def compiled(fn):
    try:
        c = torch.compile(fn, dynamic=False)
        return c
    except Exception:  # no compiler toolchain on this machine
        return None


def fwd_bwd(f, inputs):
    """Returns callables: forward only (no grad), forward+backward."""

    def fwd():
        with torch.no_grad():
            return f(*inputs)

    def full():
        for x in inputs:
            if x.is_floating_point():
                x.grad = None
        out = f(*inputs)
        out.backward(torch.ones_like(out))
        return out

    return fwd, full


def lm_head_rows(op, providers, inputs, check, dn, dev, *, repeat, with_fwd) -> list:
    """Rows of one LM-head comparison: each provider checked against the expected output (a
    provider that fails to run, e.g. torch.compile without a toolchain, is skipped), timed round
    robin with the others (fwd+bwd, and fwd when ``with_fwd``), then its peak memory alone."""
    hidden, weight, _ = inputs
    N, Hd, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    calls = {}
    for name, f in providers.items():
        fwd, full = fwd_bwd(f, inputs)
        try:
            ok = check(fwd())
        except Exception as exc:
            print(f"   provider {name} skipped: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        if not ok:
            raise AssertionError(f"{op} provider {name} gives a different result")
        calls[name] = (fwd, full)
    t_full = H.time_round_robin({n: c[1] for n, c in calls.items()}, dev, repeat=repeat)
    t_fwd = H.time_round_robin({n: c[0] for n, c in calls.items()}, dev, repeat=repeat) if with_fwd else {}
    logits_bytes = N * V * hidden.element_size()
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()  # outputs every provider makes
    rows = []
    for name, (_fwd, full) in calls.items():
        hidden.grad = weight.grad = None
        mem = H.peak_memory(full, dev)
        if with_fwd:
            rows.append(H.Row(f"{op} fwd", f"{N}x{Hd}x{V}", dn, name, t_fwd[name] * 1e3))
        rows.append(H.Row(f"{op} fwd+bwd", f"{N}x{Hd}x{V}", dn, name, t_full[name] * 1e3,
                          extra={"peak_extra_bytes": mem, "mem_x": mem / logits_bytes,
                                 "mem_x_without_grads": (mem - grads) / logits_bytes}))
    return rows


def main(argv=None) -> dict:
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = args.device
    repeat = args.repeat or (2 if args.quick else 5)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    rows: list[H.Row] = []
    dtypes = [torch.float32] if dev == "cpu" else [torch.bfloat16, torch.float32]

    # ---- token_logprobs ----
    N, V = (256, 4096) if args.quick else (4096, 32000)
    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
        logits = torch.randn(N, V, device=dev, dtype=dtype).requires_grad_()
        tokens = torch.randint(0, V, (N,), device=dev)
        providers = {
            "kernel": lambda l, t: fastrlhf.ops.token_logprobs(l, t, impl="kernel"),
            "eager": eager_logprobs,
            "reference": lambda l, t: fastrlhf.ops.token_logprobs(l, t, impl="reference"),
        }
        if not args.quick:
            c = compiled(eager_logprobs)
            if c is not None:
                providers["compile"] = c
        want = eager_logprobs(logits.detach(), tokens)
        logits_bytes = logits.numel() * logits.element_size()
        for name, f in list(providers.items()):
            fwd, full = fwd_bwd(f, (logits, tokens))
            try:
                err = (fwd().float() - want).abs().max().item()
            except Exception as exc:  # e.g. torch.compile without a working C++ toolchain
                print(f"   provider {name} skipped: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            if not err < 2e-2:
                raise AssertionError(f"token_logprobs provider {name} differs by {err}")
            t_f = H.time_fn(fwd, dev, repeat=repeat)
            t_full = H.time_fn(full, dev, repeat=repeat)
            logits.grad = None  # measure from a state without a previous gradient
            mem = H.peak_memory(full, dev)
            gbps = 3 * logits_bytes / t_full / 1e9
            extra = {"peak_extra_bytes": mem, "mem_x": mem / logits_bytes}
            if name in ("kernel", "eager"):
                extra["frac_bw_paired"] = H.paired_bandwidth_fraction(full, 3 * logits_bytes, dev,
                                                                      buffer_bytes=logits_bytes, repeat=repeat + 2)
            rows.append(H.Row("token_logprobs fwd", f"{N}x{V}", dn, name, t_f * 1e3))
            rows.append(H.Row("token_logprobs fwd+bwd", f"{N}x{V}", dn, name, t_full * 1e3, gbps, gbps / bw,
                              extra=extra))

    # ---- linear_token_logprobs ----
    N, Hd, V = (256, 128, 2048) if args.quick else (4096, 1024, 32000)
    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
        hidden = (torch.randn(N, Hd, device=dev, dtype=dtype) / Hd**0.5).requires_grad_()
        weight = torch.randn(V, Hd, device=dev, dtype=dtype).requires_grad_()
        tokens = torch.randint(0, V, (N,), device=dev)
        providers = {
            "kernel": lambda h, w, t: fastrlhf.ops.linear_token_logprobs(h, w, t, impl="kernel"),
            "eager": eager_linear_logprobs,
        }
        if not args.quick:
            c = compiled(eager_linear_logprobs)
            if c is not None:
                providers["compile"] = c
        want = eager_linear_logprobs(hidden.detach(), weight.detach(), tokens)
        check = lambda out: (out.float() - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item())  # noqa: E731
        rows += lm_head_rows("linear_token_logprobs", providers, (hidden, weight, tokens), check, dn, dev,
                             repeat=max(3, repeat // 2), with_fwd=True)

    # ---- linear_token_loss: the same LM head with the loss known up front (3 matmuls) ----
    # loss = token-weighted sum of log-probs (SFT cross-entropy with weights / a policy-gradient
    # surrogate); providers differ in how the log-probs and their gradients are made.
    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
        hidden = (torch.randn(N, Hd, device=dev, dtype=dtype) / Hd**0.5).requires_grad_()
        weight = torch.randn(V, Hd, device=dev, dtype=dtype).requires_grad_()
        tokens = torch.randint(0, V, (N,), device=dev)
        w = torch.rand(N, device=dev) / N
        providers = {
            "kernel": lambda h, W, t: fastrlhf.ops.linear_token_loss(
                h, W, t, lambda lp, ent, rows: -(lp * w[rows]).sum(), impl="kernel").loss,
            "linear_token_logprobs": lambda h, W, t: -(fastrlhf.ops.linear_token_logprobs(h, W, t) * w).sum(),
            "eager": lambda h, W, t: -(eager_linear_logprobs(h, W, t) * w).sum(),
        }
        if not args.quick:
            c = compiled(providers["eager"])
            if c is not None:
                providers["compile"] = c
        want = providers["eager"](hidden.detach(), weight.detach(), tokens).item()
        check = lambda out: abs(out.item() - want) < 1e-2 * max(1.0, abs(want))  # noqa: E731
        rows += lm_head_rows("linear_token_loss", providers, (hidden, weight, tokens), check, dn, dev,
                             repeat=max(3, repeat // 2), with_fwd=False)
    H.add_speedups(rows, "eager")
    return H.report("token_logprobs", rows, args, {"copy_bandwidth_GBps": round(bw, 1),
                                                   "matmul_GFLOPs": round(H.matmul_gflops(dev, quick=args.quick), 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
