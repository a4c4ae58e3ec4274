"""allocator: a LoRA GRPO step on the CPU with glibc's default malloc vs
``fastrlhf.runtime.retain_freed_memory`` (what the ``fastrlhf`` command applies).

By default glibc ``mmap``s large blocks one by one and trims the heap's top, so a step that
allocates and frees a few GB (sampling, a reference forward, training micro-batches) faults its
pages in afresh. The workload is the memory traffic of one GRPO step of the demo: a LoRA (r = 8)
model of SmolLM2-135M's geometry (30 layers, hidden 576, vocab 49152; random weights) samples 64
tokens after 24 prompts of 32, runs a no-grad reference forward (adapters off), then forward +
backward of the fused log-prob loss in two micro-batches of 12 and an AdamW step. Each mode runs
in fresh processes (malloc settings are process-wide), alternating default / retained ``--repeat``
times (default 2); each process times ``--steps`` steps (default 3) after one warm-up step; the
table gives the median step over all of a mode's processes."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import _harness as H

GEOMETRY = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
QUICK_GEOMETRY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MODES = ("glibc default", "retained")


def child(mode: str, quick: bool, steps: int) -> list[float]:
    """Step times (s) of one process: ``steps`` steps after a warm-up step."""
    import torch

    from fastrlhf.generation import GenerationConfig, generate
    from fastrlhf.models import CausalLM, CausalLMConfig, apply_lora, lora_disabled
    from fastrlhf.runtime import retain_freed_memory

    if mode == "retained" and not retain_freed_memory():
        raise SystemExit("retain_freed_memory: no glibc here")
    torch.manual_seed(0)
    geometry = QUICK_GEOMETRY if quick else GEOMETRY
    model = apply_lora(CausalLM(CausalLMConfig(**geometry)), r=8, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    B, P, L, micro = (4, 4, 8, 2) if quick else (24, 32, 64, 12)
    prompts = torch.randint(1, geometry["vocab_size"], (B, P))
    gen = GenerationConfig(max_new_tokens=L, temperature=1.0, seed=0)

    def step():  # a GRPO step's memory traffic: sample, reference forward, two micro-batches, AdamW
        out = generate(model, prompts, torch.ones_like(prompts), gen)
        seqs, mask = out.sequences, out.attention_mask
        with torch.no_grad(), lora_disabled(model):
            model.token_logprobs(seqs, mask, start=P - 1)
        model.train()
        for i in range(0, B, micro):
            loss = model.token_loss(seqs[i:i + micro], lambda lp, ent, chunk: -lp.sum(), mask[i:i + micro],
                                    start=P - 1).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def main(argv=None) -> dict:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="timed steps per process")
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 3)
    if args.child:
        print(json.dumps(child(args.child, args.quick, steps)))
        return {}
    if args.device != "cpu":
        raise SystemExit("allocator: a CPU benchmark (glibc's malloc); run it with --device cpu")
    repeat = args.repeat or (1 if args.quick else 2)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeat):
        for mode in MODES:  # alternating: a noisy spell of the machine hits both modes
            cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--device", "cpu"]
            out = subprocess.run(cmd + ["--quick"] * args.quick, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"allocator child ({mode}) failed:\n{out.stderr[-2000:]}")
            times[mode].extend(json.loads(out.stdout.strip().splitlines()[-1]))
    shape = "4x(4+8) tiny" if args.quick else "24x(32+64) SmolLM2-135M geometry, LoRA r=8"
    rows = [H.Row("lora_grpo_step", shape, "fp32", mode, statistics.median(t) * 1e3) for mode, t in times.items()]
    H.add_speedups(rows, "glibc default")
    bw, gflops = H.measure_bandwidth("cpu", quick=args.quick), H.matmul_gflops("cpu", quick=args.quick)
    return H.report("allocator", rows, args, {"processes_per_mode": repeat, "steps_per_process": steps,
                                               "copy_bandwidth_GBps": round(bw, 1), "matmul_gflops": round(gflops, 1)})


if __name__ == "__main__":
    main()
