"""generate: tokens/s of fastrlhf's batched KV-cache generation vs Hugging Face transformers'
``generate`` on the same weights (a Llama config built locally, converted with ``from_hf``), and
of fastrlhf's adapter path over the transformers model. Sampling with temperature + top-p, no
stop token (every row generates max_new_tokens), one run side by side. Reports time, tokens/s,
the prefill / decode / sampling split of the fastrlhf paths and the model FLOP rate as a
fraction of a matmul measured in the same run. Providers run round robin, median of 5 rounds,
every one timed the same way (no synchronization inside a timed call); on CUDA the phase split
comes from separate calls that synchronize around each phase, never timed.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import torch

from fastrlhf.generation import GenerationConfig, generate
from fastrlhf.models import CausalLM

import _harness as H

# ~16M parameters: 6 layers, hidden 384, 6 heads (D = 64), 2 kv heads, SwiGLU 1024, vocab 8192
MODEL = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024)
QUICK_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def main(argv=None) -> dict:
    p = H.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    try:
        import transformers
    except ImportError:
        p.error("bench/generate.py needs transformers (pip install 'fastrlhf[hf]')")
    dev = args.device
    quick = args.quick
    B, P, N = (2, 8, 8) if quick else (16, 64, 128)
    repeat = args.repeat or (1 if quick else 5)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**(QUICK_MODEL if quick else MODEL), pad_token_id=0, bos_token_id=None,
                                         eos_token_id=None)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(dev).eval()
    model = CausalLM.from_hf(hf).eval()
    n_params = model.num_parameters()
    V = hf_config.vocab_size
    lengths = torch.randint(P // 2, P + 1, (B,))  # mixed prompt lengths, left-padded
    mask = (torch.arange(P) >= P - lengths[:, None]).long()
    ids = (torch.randint(1, V, (B, P)) * mask).to(dev)
    mask = mask.to(dev)
    gen = GenerationConfig(max_new_tokens=N, temperature=0.8, top_p=0.9, stop_token_ids=[], seed=0,
                           synchronize_timings=False)  # timed calls: no sync inside, as transformers' generate

    splits: dict[str, list[dict]] = {"fastrlhf": [], "fastrlhf_hf_adapter": []}  # per-call phase timings

    def ours():
        out = generate(model, ids, mask, gen)
        splits["fastrlhf"].append(out.timings)
        return out

    def adapter():
        out = generate(hf, ids, mask, gen)
        splits["fastrlhf_hf_adapter"].append(out.timings)
        return out

    def transformers_generate():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=True,
                           temperature=0.8, top_p=0.9, top_k=0, pad_token_id=0)

    bw = H.measure_bandwidth(dev, quick=quick)
    mm = H.matmul_gflops(dev, quick=quick)
    rows: list[H.Row] = []
    shape = f"B{B} P{P} N{N} {n_params / 1e6:.1f}M"
    providers = {"fastrlhf": ours, "fastrlhf_hf_adapter": adapter, "transformers": transformers_generate}
    times = H.time_round_robin(providers, dev, repeat=repeat)
    if dev.startswith("cuda"):  # the timed calls' phase times are launch times there: split from synced calls
        synced = dataclasses.replace(gen, synchronize_timings=True)
        for name, m in (("fastrlhf", model), ("fastrlhf_hf_adapter", hf)):
            splits[name] = [generate(m, ids, mask, synced).timings for _ in range(repeat)]
    for name in providers:
        t = times[name]
        tokens = B * N
        gflops = 2 * n_params * (tokens + int(lengths.sum())) / t / 1e9
        extra = {"tokens_per_s": tokens / t, "gflops": gflops, "frac_matmul": gflops / mm}
        if name in splits:
            for phase in ("prefill", "decode", "sample"):
                extra[f"{phase}_ms"] = 1e3 * statistics.median(c[phase] for c in splits[name][-repeat:])
        rows.append(H.Row("generate", shape, "fp32", name, t * 1e3, extra=extra))
    H.add_speedups(rows, "transformers")
    return H.report("generate", rows, args, {"copy_bandwidth_GBps": round(bw, 1), "matmul_GFLOPs": round(mm, 1),
                                             "transformers": transformers.__version__,
                                             "sampling": "temperature 0.8, top-p 0.9, no stop token",
                                             "note": "GFLOP/s = 2 x params x (prompt + new tokens) / time"})


if __name__ == "__main__":
    main(sys.argv[1:])
