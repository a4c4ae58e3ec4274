"""Run every benchmark in bench/ in one process and print one table (``make bench``). Each script's
result goes to ``--out`` (default bench/out/, untracked; ``make bench`` passes --out
bench/results, the committed results), and so does summary-<kind>.txt: this run's rows merged
with the rows of the benchmarks not run this time, kept from the result files already in that
directory and marked with the date of their run.

Usage: python bench/all.py [--quick] [--device cpu|cuda] [--only gae,whiten] [--out DIR]
       python bench/all.py --summarize [--device ...] [--out DIR]   (table of the saved results only)
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

BENCHES = [
    "gae", "group_advantages", "whiten", "td_targets", "token_logprobs", "losses", "preference_loss", "sample",
    "attention", "generate", "rl_step", "allocator",
]
CPU_ONLY = {"rl_step", "allocator"}  # rl_step: its plain provider is set up for the CPU; allocator: glibc


def main(argv=None) -> int:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    p.add_argument("--summarize", action="store_true", help="print/write the table of the saved results, run nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or BENCHES
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    kind = H.result_kind(args.device, args.quick)
    if args.device != "cpu" and not args.summarize:
        skipped = [n for n in names if n in CPU_ONLY]
        names = [n for n in names if n not in CPU_ONLY]
        if skipped:
            print(f"skipping {', '.join(skipped)} (CPU only)")
    if args.summarize:
        only = set(names) if args.only else None
        rows, labels, _ = merged_rows(args.out, kind, {}, "", only)
        if not rows:
            print(f"no {kind} results under {H.shown_path(args.out)}")
            return 1
        print(H.format_table(rows, labels))
        if not args.no_save:
            write_summary(args.out, kind, {}, "", only)
        return 0
    forwarded = ["--device", args.device, "--out", args.out, "--no-table"] + ["--quick"] * args.quick
    forwarded += ["--no-save"] * args.no_save
    if args.repeat is not None:
        forwarded += ["--repeat", str(args.repeat)]
    t0 = time.time()
    date = H.now()
    results: dict[str, dict] = {}
    try:
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] bench/{name}.py ...", flush=True)
            results[name] = importlib.import_module(name).main(forwarded)
    except KeyboardInterrupt:
        saved = "nothing was saved (--no-save)" if args.no_save else \
            f"results of the finished benchmarks are already under {H.shown_path(args.out)}/"
        print(f"\ninterrupted: {saved}")
        return 130
    rows = [H.Row(**r) for name in names for r in results[name]["rows"]]
    print(f"\n== all benchmarks ({time.time() - t0:.0f} s) ==")
    print(H.format_table(rows))  # this run's rows, once (the scripts printed no table of their own)
    if not args.no_save:
        write_summary(args.out, kind, results, date)
    return 0


def merged_rows(out_dir: str, kind: str, results: dict[str, dict], date: str, only: set[str] | None = None):
    """This run's rows (``results``: bench name -> result) and, for every other benchmark with a
    ``<name>-<kind>.json`` in ``out_dir`` (those in ``only`` when given), the rows saved there; each
    row labelled with the date of its run. Returns (rows, labels, {bench: label} of the benchmarks
    kept from earlier runs)."""
    saved = {os.path.basename(f)[: -len(f"-{kind}.json")]: f
             for f in glob.glob(os.path.join(out_dir, f"*-{kind}.json"))}
    order = BENCHES + sorted(set(saved) - set(BENCHES))
    rows: list[H.Row] = []
    labels: list[str] = []
    kept: dict[str, str] = {}
    this_run = date[:16].replace("T", " ")
    for name in order:
        if name in results:
            new = [H.Row(**r) for r in results[name]["rows"]]
            label = this_run
        elif name in saved and (only is None or name in only):
            result, new = H.load_result(saved[name])
            label = kept[name] = H.run_date(saved[name], result)
        else:
            continue
        rows += new
        labels += [label] * len(new)
    return rows, labels, kept


def write_summary(out_dir: str, kind: str, results: dict[str, dict], date: str,
                  only: set[str] | None = None) -> None:
    rows, labels, kept = merged_rows(out_dir, kind, results, date, only)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"summary-{kind}.txt")
    ran = ", ".join(results) or "none (--summarize)"
    earlier = ", ".join(f"{name} ({label})" for name, label in kept.items()) or "none"
    with open(path, "w") as f:
        f.write(f"# fastrlhf benchmarks on {kind}, written {H.now()[:16].replace('T', ' ')} by bench/all.py\n")
        f.write(f"# run this time: {ran}\n# kept from earlier runs (their JSON beside this file): {earlier}\n")
        f.write("# The run column dates each row's run; each op's JSON has the machine and the bandwidth / matmul\n")
        f.write("# ceilings measured in the same run as the op.\n")
        f.write(H.format_table(rows, labels) + "\n")
    n_new = sum(len(r["rows"]) for r in results.values())
    print(f"   wrote {H.shown_path(path)}: {n_new} rows of this run + {len(rows) - n_new} kept from earlier runs"
          + (f" ({earlier})" if kept else ""))


if __name__ == "__main__":
    sys.exit(main())
