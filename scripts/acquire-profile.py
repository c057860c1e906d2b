#!/usr/bin/env python3
"""Where the coordinator's time for each Acquire goes, from its debug lines.

Reads a coordinator log written with
    RUST_LOG=info,berth_coordinator::api=debug,berth_coordinator::pool::commit=debug
(plain or JSON format) and prints, over the acquires it answered (the
first --skip dropped, as P1 drops its warm-up cycles): the request's checks
before queueing, then from there the host's assignment, the lease
certificate signed, and the answer durable (the change committed); the
coordinator's own part (checks + durable); every store commit's duration;
and the slowest acquires step by step.

Usage:
    RUST_LOG=... BERTH_BIN_DIR=DIR DIR/berth-bench p1 --p1-cycles 300
    scripts/acquire-profile.py /tmp/berth-t/${BERTH_TEST_TAG}bn1/coordinator.log
"""

import argparse
import re
import statistics

CHECKS = re.compile(r"checks_us\D+(\d+)")
ANSWERED = re.compile(r"assigned_us\D+(\d+)\D+signed_us\D+(\d+)\D+durable_us\D+(\d+)")
COMMITTED = re.compile(r"leases committed.*?took\D*?([\d.]+)(µs|ms|s)\b")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def quantiles(values):
    s = sorted(values)
    pick = lambda p: s[min(len(s) - 1, int(p * len(s)))]
    return (f"median {statistics.median(s):7.0f}  p90 {pick(0.9):7.0f}  "
            f"p99 {pick(0.99):7.0f}  max {s[-1]:7.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--skip", type=int, default=5, help="first acquires to drop")
    ap.add_argument("--slowest", type=int, default=8)
    args = ap.parse_args()
    checks, answered, commits = [], [], []
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if "acquire request checked" in line and (m := CHECKS.search(line)):
                checks.append(int(m.group(1)))
            elif "acquire answered" in line and (m := ANSWERED.search(line)):
                answered.append(tuple(int(g) for g in m.groups()))
            elif m := COMMITTED.search(line):
                unit = {"µs": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
                commits.append(float(m.group(1)) * unit)
    # P1 asks one at a time: the n-th check belongs to the n-th answer.
    pairs = list(zip(checks, answered))[args.skip:]
    if not pairs:
        raise SystemExit(f"no acquire debug lines in {args.log} (is RUST_LOG set as above?)")
    total = [c + a[2] for c, a in pairs]
    print(f"acquires: {len(pairs)} (first {args.skip} dropped), microseconds")
    print(f"  checks before queueing   {quantiles([c for c, _ in pairs])}")
    print(f"  host assigned            {quantiles([a[0] for _, a in pairs])}")
    print(f"  certificate signed       {quantiles([a[1] for _, a in pairs])}")
    print(f"  answer durable           {quantiles([a[2] for _, a in pairs])}")
    print(f"  coordinator's part       {quantiles(total)}")
    if commits:
        print(f"store commits: {len(commits)}, microseconds each")
        print(f"  commit                   {quantiles(commits)}")
    print(f"slowest {args.slowest} acquires (checks, then assigned / signed / durable after them):")
    for i in sorted(range(len(pairs)), key=lambda i: -total[i])[:args.slowest]:
        c, (a, s, d) = pairs[i]
        print(f"  {c:6d}  {a:6d} / {s:6d} / {d:6d}")


if __name__ == "__main__":
    main()
