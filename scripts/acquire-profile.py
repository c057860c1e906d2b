#!/usr/bin/env python3
"""Where the coordinator's time for each Acquire goes, from its debug lines.

Reads a coordinator log written with
    RUST_LOG=info,berth_coordinator::api=debug,berth_coordinator::pool::commit=debug
(plain or JSON format) and prints, over the acquires it answered (the
first --skip dropped, as P1 drops its warm-up cycles): the request's checks
before queueing, then from there the host's assignment, the lease
certificate signed, and the answer durable (the change committed); the
coordinator's own part (checks + durable); every store commit's duration;
and the slowest acquires step by step. With the lines' timestamps (the
default format has them), also how long the acquire's commit waited to
start after the assignment (the committer thread waiting for a CPU, or a
commit already under way) and how long the answer took to leave after it.

Usage:
    RUST_LOG=... BERTH_BIN_DIR=DIR DIR/berth-bench p1 --p1-cycles 300
    scripts/acquire-profile.py /tmp/berth-t/${BERTH_TEST_TAG}bn1/coordinator.log
"""

import argparse
import datetime
import re
import statistics

CHECKS = re.compile(r"checks_us\D+(\d+)")
ANSWERED = re.compile(r"assigned_us\D+(\d+)\D+signed_us\D+(\d+)\D+durable_us\D+(\d+)")
COMMITTED = re.compile(r"leases committed.*?took\D*?([\d.]+)(µs|ms|s)\b")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r'^(\d{4}-\d\d-\d\dT[\d:.]+)Z|"timestamp":"([^"]+?)Z?"')


def micros(line):
    """The line's timestamp in microseconds, or None."""
    m = STAMP.search(line)
    if not m:
        return None
    stamp = datetime.datetime.fromisoformat(m.group(1) or m.group(2))
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6


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
    # Timestamps of each check line, and per answer the end and duration
    # of the last commit before it (the one that made it durable).
    checked_at, durable_by = [], []
    last_commit = None
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if "acquire request checked" in line and (m := CHECKS.search(line)):
                checks.append(int(m.group(1)))
                checked_at.append(micros(line))
            elif "acquire answered" in line and (m := ANSWERED.search(line)):
                answered.append(tuple(int(g) for g in m.groups()))
                durable_by.append((micros(line), last_commit))
            elif m := COMMITTED.search(line):
                unit = {"µs": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
                took = float(m.group(1)) * unit
                commits.append(took)
                end = micros(line)
                last_commit = None if end is None else (end, took)
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
    # The answer's timings count from just before its check line.
    gaps = []
    for at, (assigned, _, _), (answered_at, commit) in list(
        zip(checked_at, answered, durable_by)
    )[args.skip:]:
        if at is not None and answered_at is not None and commit is not None:
            end, took = commit
            gaps.append((end - took - (at + assigned), answered_at - end))
    if gaps and len(gaps) == len(pairs):
        print(f"  its commit started after the assignment  {quantiles([g for g, _ in gaps])}")
        print(f"  answer logged after its commit ended     {quantiles([g for _, g in gaps])}")
    if commits:
        print(f"store commits: {len(commits)}, microseconds each")
        print(f"  commit                   {quantiles(commits)}")
    print(f"slowest {args.slowest} acquires (checks, then assigned / signed / durable after them):")
    for i in sorted(range(len(pairs)), key=lambda i: -total[i])[:args.slowest]:
        c, (a, s, d) = pairs[i]
        print(f"  {c:6d}  {a:6d} / {s:6d} / {d:6d}")


if __name__ == "__main__":
    main()
