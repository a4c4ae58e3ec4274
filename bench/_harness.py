"""Shared benchmark harness: timing (median of repeats), the machine's own memory bandwidth,
result tables and JSON result files.

Every bench script: ``python bench/<op>.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]``.
Results go to ``--out`` (default bench/out/, untracked); only ``make bench`` writes the committed
bench/results/ (``--out bench/results``), and --quick results never go there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")  # committed: written by `make bench` only (--out bench/results)
OUT_DIR = os.path.join(BENCH_DIR, "out")  # the default --out: untracked (.gitignore)


def default_device() -> str:
    """cuda when a usable GPU is present, else cpu. Asking torch can warn ("CUDA initialization:
    ...") on a machine with CUDA libraries but no usable GPU; the answer there is cpu, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "cuda" if torch.cuda.is_available() else "cpu"


class _Parser(argparse.ArgumentParser):
    """Resolves ``--device`` only when it is not given, so ``--device cpu`` never touches CUDA, and
    keeps --quick results out of the committed bench/results/."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "device", "") is None:
            ns.device = default_device()
        if (getattr(ns, "quick", False) and not getattr(ns, "no_save", True)
                and os.path.realpath(ns.out) == os.path.realpath(RESULTS_DIR)):
            self.error("--quick results never go to bench/results/ (the committed full runs): "
                       "pass another --out, or --no-save")
        return ns, rest


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds): proves the script runs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats per provider (median reported)")
    p.add_argument("--out", default=OUT_DIR, metavar="DIR",
                   help="directory of the result JSON (default bench/out/, untracked; `make bench` passes "
                        "--out bench/results, the committed results)")
    p.add_argument("--no-save", action="store_true", help="write no result file")
    p.add_argument("--no-table", action="store_true",
                   help="print no table (bench/all.py prints one table of every script's rows)")
    return p


def result_kind(device: str, quick: bool) -> str:
    """The file name tag of a run's results: cpu / cuda, with -quick for --quick runs (so a quick
    run never overwrites or merges with a full run's results)."""
    return ("cpu" if device == "cpu" else "cuda") + ("-quick" if quick else "")


def result_path(out_dir: str, name: str, kind: str) -> str:
    return os.path.join(out_dir, f"{name}-{kind}.json")


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
    ceiling_gbps: float | None = None  # the copy bandwidth frac_bw divides by (measured in the same run)


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


def _pct(frac: float, what: str) -> str:
    """A fraction as a percentage; above 1 it says so (never a bare "124%")."""
    return f"{100 * frac:.0f}% {what}" + (" (above it)" if frac > 1 else "")


def _extra_cell(extra: dict) -> str:
    also = "".join(f"; {s:.1f}x vs {name}" for name, s in extra.get("speedup_also", {}).items())
    if "tokens_per_s" in extra:
        split = ", ".join(f"{k[:-3]} {extra[k]:.0f}" for k in ("prefill_ms", "decode_ms", "sample_ms") if k in extra)
        return (f"{extra['tokens_per_s']:.0f} tok/s, {extra['gflops']:.0f} GFLOP/s = "
                f"{_pct(extra['frac_matmul'], 'of matmul')}" + (f"; ms: {split}" if split else "") + also)
    if "mem_x_without_grads" in extra:
        return f"peak {extra['mem_x']:.2f}x logits ({extra['mem_x_without_grads']:.2f}x without the grads)" + also
    if "mem_x" in extra:
        paired = f", {_pct(extra['frac_bw_paired'], 'of paired copy bw')}" if "frac_bw_paired" in extra else ""
        return f"peak {extra['mem_x']:.2f}x logits{paired}" + also
    if "passes_over_logits" in extra:
        return f"{extra['passes_over_logits']:.1f} passes" + also
    if "gflops" in extra:
        return f"{extra['gflops']:.0f} GFLOP/s = {_pct(extra['frac_matmul'], 'of matmul')}" + also
    return also[2:]


ABOVE_CEILING = "*"


def format_table(rows: list[Row], run: list[str] | None = None) -> str:
    """The rows as one text table, with the note lines that say what the fractions divide by.
    ``run``: a label per row (the date of the run it comes from), shown as a column."""
    head = ["op", "shape", "dtype", "provider", "ms", "GB/s", "ceiling GB/s", "%bw", "speedup"]
    head += ["run"] * (run is not None) + ["notes"]
    lines = [head]
    above = False
    for i, r in enumerate(rows):
        frac = r.frac_bw
        if frac is None and r.gbps is not None and r.ceiling_gbps:
            frac = r.gbps / r.ceiling_gbps
        above |= frac is not None and frac > 1
        lines.append([
            r.op, r.shape, r.dtype, r.provider, f"{r.ms:.3f}",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.gbps is None or r.ceiling_gbps is None else f"{r.ceiling_gbps:.1f}",
            "" if frac is None else f"{100 * frac:.0f}%" + (ABOVE_CEILING if frac > 1 else ""),
            "" if r.speedup is None else f"{r.speedup:.1f}x vs {r.vs}",
            *([run[i]] if run is not None else []),
            _extra_cell(r.extra),
        ])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for j, l in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    if any(r.gbps is not None for r in rows):
        out.append("%bw = GB/s / ceiling GB/s; ceiling = copy bandwidth (bytes read + written per second) of a "
                   "1 GiB buffer (64 MiB with --quick) measured in the same run as the row (full runs: the higher "
                   "of the measurements before and after the rows).")
    if above:
        out.append(f"{ABOVE_CEILING} above the run's measured copy ceiling: the op's working set fits in cache "
                   "(the ceiling copies a buffer that does not), or the machine ran faster during the op than "
                   "while the ceiling was measured. Not a fraction of a hardware limit.")
    if any("frac_matmul" in r.extra for r in rows):
        out.append("% of matmul = GFLOP/s / that of a square fp32 matmul (n = 2048, 512 with --quick) measured in "
                   "the same run (full runs: the higher of the measurements before and after the rows).")
    if any("frac_bw_paired" in r.extra for r in rows):
        out.append("paired copy bw: the op's bandwidth / that of a copy timed right after it, median of such pairs "
                   "(robust to the machine's drift).")
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


def set_ceilings(rows: list[Row], context: dict) -> None:
    """Record on every bandwidth row the copy bandwidth its %bw divides by (``context``'s
    ``copy_bandwidth_GBps``: what the table prints as the ceiling) and make ``frac_bw`` that exact
    ratio."""
    bw = context.get("copy_bandwidth_GBps")
    if not bw:
        return
    for r in rows:
        if r.gbps is not None:
            r.ceiling_gbps = bw
            r.frac_bw = r.gbps / bw


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def report(name: str, rows: list[Row], args, context: dict) -> dict:
    """Print the context and (unless --no-table) the table; unless --no-save write
    ``<args.out>/<name>-<kind>.json`` (kind: cpu / cuda, -quick for --quick runs). Fractions of the
    machine's ceilings use the higher of the measurements before and after the rows
    (settle_ceilings; full runs only)."""
    if not args.quick:
        settle_ceilings(rows, args.device, context)
    set_ceilings(rows, context)
    result = {"bench": name, "quick": args.quick, "device": args.device, "date": now(), "context": context,
              "machine": machine_info(args.device), "rows": [asdict(r) for r in rows]}
    print(f"\n== {name} on {args.device} ({result['machine']['processor']}, "
          f"{result['machine']['torch_threads']} threads) ==")
    for k, v in context.items():
        print(f"   {k}: {v}")
    if not getattr(args, "no_table", False):
        print(format_table(rows))
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        path = result_path(args.out, name, result_kind(args.device, args.quick))
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"   wrote {shown_path(path)}")
    return result


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if rel.startswith("..") else rel


def load_result(path: str) -> tuple[dict, list[Row]]:
    """A result JSON written by :func:`report` and its rows (older files: the ceiling of each
    bandwidth row filled in from the file's context)."""
    with open(path) as f:
        result = json.load(f)
    rows = [Row(**r) for r in result["rows"]]
    bw = result.get("context", {}).get("copy_bandwidth_GBps")
    for r in rows:
        if r.gbps is not None and r.ceiling_gbps is None and bw:
            r.ceiling_gbps = bw
    return result, rows


def run_date(path: str, result: dict) -> str:
    """When the run of a result file happened: its ``date`` ("YYYY-MM-DD HH:MM"). Files written
    before results carried one: the date of the commit that added them ("committed YYYY-MM-DD"),
    else the file's modification time ("file YYYY-MM-DD HH:MM")."""
    if result.get("date"):
        return result["date"][:16].replace("T", " ")
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", os.path.basename(path)],
                             cwd=os.path.dirname(os.path.abspath(path)), capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"committed {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return "file " + time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))


def add_speedups(rows: list[Row], baseline: str, also: tuple[str, ...] = ()) -> None:
    """Fill ``speedup`` of each row relative to the ``baseline`` provider of the same op/shape/dtype;
    the speedups relative to the providers in ``also`` go to ``extra["speedup_also"]`` (notes)."""
    times: dict[str, dict] = {name: {} for name in (baseline, *also)}
    for r in rows:
        if r.provider in times:
            times[r.provider][(r.op, r.shape, r.dtype)] = r.ms
    for r in rows:
        key = (r.op, r.shape, r.dtype)
        b = times[baseline].get(key)
        if b is not None and r.provider != baseline:
            r.speedup, r.vs = b / r.ms, baseline
        if r.provider not in times:
            other = {name: times[name][key] / r.ms for name in also if key in times[name]}
            if other:
                r.extra["speedup_also"] = other
