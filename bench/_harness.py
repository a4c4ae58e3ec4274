"""Shared benchmark harness: timing (median of repeats), the machine's own memory bandwidth,
result tables and files under bench/results/.

Every bench script: ``python bench/<op>.py [--quick] [--device cpu|cuda] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds): proves the script runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats per provider (median reported)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, repeat: int, min_time: float = 0.0,
            max_time: float = 10.0) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeat`` runs after one warm-up run.
    Slow providers stop early once ``max_time`` seconds have been spent (at least 2 runs)."""
    fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat or spent < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_time and len(times) >= 2:
            break
    return statistics.median(times)


def time_round_robin(fns: dict[str, Callable[[], object]], device: str, *, repeat: int) -> dict[str, float]:
    """Median wall time in seconds of each ``fns[name]()``, called round robin (one call of each
    per round, after one warm-up call each): a shared machine's slow spells then hit every
    provider alike, and the ratios between them hold even when the machine drifts."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
        sync(device)
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


_MALLOC_FIXED = False


def _fix_malloc_threshold() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) after large buffers are freed, so later
    chunk-sized buffers come from a heap that keeps them resident and peaks are underestimated,
    differently run to run. A fixed threshold keeps buffers >= 1 MiB mmapped (returned on free)."""
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return
    _MALLOC_FIXED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (setting it disables the dynamic one)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """Peak memory (bytes) allocated while running ``fn`` once, above what was live before.
    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs) minus the resident set before; large tensors are mmapped and
    returned to the OS when freed, so this tracks tensor memory. Returns NaN where unsupported."""
    import gc

    _fix_malloc_threshold()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_bytes("VmRSS:")
    fn()
    return float(_rss_bytes("VmHWM:") - before)


def measure_bandwidth(device: str, *, quick: bool) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), median of 5 copies of a
    1 GiB buffer (64 MiB with --quick): the ceiling for memory-bound kernels on this machine."""
    n = (64 if quick else 1024) * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeat=3 if quick else 5)
    return 2 * n * 4 / t / 1e9


def paired_bandwidth_fraction(fn: Callable[[], object], bytes_moved: float, device: str, *, buffer_bytes: int,
                              repeat: int = 7) -> float:
    """Median over ``repeat`` back-to-back pairs of (``bytes_moved`` / time of ``fn()``) / (copy
    bandwidth of a ``buffer_bytes`` buffer measured right after it). The machine's bandwidth
    drifts within a run (24-53 GB/s), so a fraction of one ceiling measured minutes away can be
    off by 2x either way; each pair here sees the same moment."""
    n = max(1, buffer_bytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    fn()
    sync(device)
    fracs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        t1 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        t2 = time.perf_counter()
        fracs.append((bytes_moved / (t1 - t0)) / (2 * n * 4 / (t2 - t1)))
    del src, dst
    return statistics.median(fracs)


def matmul_gflops(device: str, *, quick: bool) -> float:
    """fp32 GEMM throughput (GFLOP/s) of a square matmul: the compute ceiling."""
    n = 512 if quick else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_fn(lambda: a @ b, device, repeat=3)
    return 2 * n**3 / t / 1e9


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    provider: str
    ms: float
    gbps: float | None = None  # effective bandwidth: bytes the op must move / time
    frac_bw: float | None = None  # gbps / measured copy bandwidth
    speedup: float | None = None  # baseline time / this time (baseline named in `vs`)
    vs: str | None = None
    extra: dict = field(default_factory=dict)


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import fastrlhf

        info["fastrlhf_build"] = fastrlhf.build_info()
    except Exception as exc:  # the bench still reports the baselines
        info["fastrlhf_build"] = str(exc)
    return info


def _extra_cell(extra: dict) -> str:
    if "tokens_per_s" in extra:
        split = ", ".join(f"{k[:-3]} {extra[k]:.0f}" for k in ("prefill_ms", "decode_ms", "sample_ms") if k in extra)
        return (f"{extra['tokens_per_s']:.0f} tok/s, {extra['gflops']:.0f} GFLOP/s = {100 * extra['frac_matmul']:.0f}% "
                f"matmul" + (f"; ms: {split}" if split else ""))
    if "mem_x_without_grads" in extra:
        return f"peak {extra['mem_x']:.2f}x logits ({extra['mem_x_without_grads']:.2f}x without the grads)"
    if "mem_x" in extra:
        paired = f", {100 * extra['frac_bw_paired']:.0f}% of paired copy bw" if "frac_bw_paired" in extra else ""
        return f"peak {extra['mem_x']:.2f}x logits{paired}"
    if "passes_over_logits" in extra:
        return f"{extra['passes_over_logits']:.1f} passes"
    if "gflops" in extra:
        return f"{extra['gflops']:.0f} GFLOP/s = {100 * extra['frac_matmul']:.0f}% matmul"
    return ""


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "provider", "ms", "GB/s", "%bw", "speedup", "notes"]
    lines = [head]
    for r in rows:
        lines.append([
            r.op, r.shape, r.dtype, r.provider, f"{r.ms:.3f}",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.frac_bw is None else f"{100 * r.frac_bw:.0f}%",
            "" if r.speedup is None else f"{r.speedup:.1f}x vs {r.vs}",
            _extra_cell(r.extra),
        ])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for j, l in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(l, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def settle_ceilings(rows: list[Row], device: str, context: dict) -> None:
    """The machine is shared and its speed drifts during a run (copy bandwidth 24-45 GB/s and
    matmul 98-210 GFLOP/s in one day): measure the ceilings in ``context`` again after the rows
    and divide by the higher of the two measurements, so no fraction is inflated by a slow moment
    when the first one was taken. Both measurements are kept in ``context``."""
    if "copy_bandwidth_GBps" in context:
        start, end = context["copy_bandwidth_GBps"], measure_bandwidth(device, quick=False)
        bw = max(start, end)
        context["copy_bandwidth_GBps"], context["copy_bandwidth_GBps_start_end"] = round(bw, 1), [start, round(end, 1)]
        for r in rows:
            if r.gbps is not None:
                r.frac_bw = r.gbps / bw
    if "matmul_GFLOPs" in context:
        start, end = context["matmul_GFLOPs"], matmul_gflops(device, quick=False)
        mm = max(start, end)
        context["matmul_GFLOPs"], context["matmul_GFLOPs_start_end"] = round(mm, 1), [start, round(end, 1)]
        for r in rows:
            if "gflops" in r.extra:
                r.extra["frac_matmul"] = r.extra["gflops"] / mm


def report(name: str, rows: list[Row], args, context: dict) -> dict:
    """Print the table and (unless --no-save / --quick) write bench/results/<name>-<device>.json.
    Fractions of the machine's ceilings use the higher of the measurements before and after the
    rows (settle_ceilings)."""
    if not args.quick:
        settle_ceilings(rows, args.device, context)
    result = {"bench": name, "quick": args.quick, "device": args.device, "context": context,
              "machine": machine_info(args.device), "rows": [asdict(r) for r in rows]}
    print(f"\n== {name} on {args.device} ({result['machine']['processor']}, "
          f"{result['machine']['torch_threads']} threads) ==")
    for k, v in context.items():
        print(f"   {k}: {v}")
    print(format_table(rows))
    if not args.no_save and not args.quick:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        kind = "cpu" if args.device == "cpu" else "cuda"
        path = os.path.join(RESULTS_DIR, f"{name}-{kind}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"   wrote {os.path.relpath(path)}")
    return result


def add_speedups(rows: list[Row], baseline: str) -> None:
    """Fill ``speedup`` of each row relative to the ``baseline`` provider of the same op/shape/dtype."""
    base = {(r.op, r.shape, r.dtype): r.ms for r in rows if r.provider == baseline}
    for r in rows:
        b = base.get((r.op, r.shape, r.dtype))
        if b is not None and r.provider != baseline:
            r.speedup, r.vs = b / r.ms, baseline
