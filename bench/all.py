"""Run every benchmark in bench/ in one process and print one table (``make bench``).

Usage: python bench/all.py [--quick] [--device cpu|cuda] [--only gae,whiten]
"""

from __future__ import annotations

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

BENCHES = ["gae", "group_advantages", "whiten", "td_targets", "token_logprobs", "losses", "sample"]


def main(argv=None) -> int:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or BENCHES
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    forwarded = ["--device", args.device] + ["--quick"] * args.quick + ["--no-save"] * args.no_save
    if args.repeat is not None:
        forwarded += ["--repeat", str(args.repeat)]
    rows = []
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
    print(H.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
