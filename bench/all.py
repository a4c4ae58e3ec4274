"""Run every benchmark in bench/ in one process and print one table (``make bench``); the table
is also written to bench/results/summary-<cpu|cuda>.txt.

Usage: python bench/all.py [--quick] [--device cpu|cuda] [--only gae,whiten]
       python bench/all.py --summarize [--device ...]   (table from the saved results only)
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

BENCHES = [
    "gae", "group_advantages", "whiten", "td_targets", "token_logprobs", "losses", "preference_loss", "sample",
    "attention", "generate",
]


def main(argv=None) -> int:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    p.add_argument("--summarize", action="store_true", help="print/write the table of the saved results, run nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or BENCHES
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    forwarded = ["--device", args.device] + ["--quick"] * args.quick + ["--no-save"] * args.no_save
    if args.repeat is not None:
        forwarded += ["--repeat", str(args.repeat)]
    kind = "cpu" if args.device == "cpu" else "cuda"
    rows = []
    if args.summarize:
        for name in names:
            path = os.path.join(H.RESULTS_DIR, f"{name}-{kind}.json")
            if os.path.exists(path):
                with open(path) as f:
                    rows += [H.Row(**r) for r in json.load(f)["rows"]]
        write_summary(rows, kind, "from saved results")
        return 0
    t0 = time.time()
    try:
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] bench/{name}.py ...", flush=True)
            result = importlib.import_module(name).main(forwarded)
            rows += [H.Row(**r) for r in result["rows"]]
    except KeyboardInterrupt:
        print("\ninterrupted: results of the finished benchmarks are already under bench/results/")
        return 130
    print(f"\n== all benchmarks ({time.time() - t0:.0f} s) ==")
    if args.quick or args.no_save:
        print(H.format_table(rows))
    else:
        write_summary(rows, kind, f"one run, {time.time() - t0:.0f} s")
    return 0


def write_summary(rows, kind: str, how: str) -> None:
    table = H.format_table(rows)
    print(table)
    os.makedirs(H.RESULTS_DIR, exist_ok=True)
    path = os.path.join(H.RESULTS_DIR, f"summary-{kind}.txt")
    with open(path, "w") as f:
        f.write(f"# fastrlhf benchmarks on {kind} ({how}); per-op JSON beside this file has the machine\n")
        f.write("# and the bandwidth / matmul ceilings measured in the same run as each op.\n")
        f.write(table + "\n")
    print(f"   wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    sys.exit(main())
