#!/usr/bin/env python3
"""Where an acquire's time goes, from the logs of a benchmark run.

Reads the coordinator's and agents' logs in a scenario directory (default
/tmp/berth-t/bn1, P1's) and prints, per step of the acquire path, the median
time between consecutive log lines of the same lease:

  requested  the coordinator has the Acquire (`lease step ... requested`)
  leased     the agent has the lease (`host state ... to=Leased`)
  front      the agent's front is open (`docker front open`)
  armed      the agent has armed the deadline, right before it accepts
  accepted   the coordinator has the acceptance (`reason=lease accepted`)
  released   the coordinator has the client's next call, Release

Usage: scripts/lease-steps.py [DIR]
"""
import glob
import re
import statistics
import sys
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LEASE = re.compile(r'lease_id="?([0-9a-f-]{36})')
STEPS = [
    ("requested", 'step="requested"'),
    ("leased", "to=Leased"),
    ("front", "docker front open"),
    ("armed", "lease deadline armed"),
    ("accepted", "reason=lease accepted"),
    ("released", 'to="released"'),
]


def millis(line):
    return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp() * 1000


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "/tmp/berth-t/bn1"
    seen = {}
    for path in glob.glob(where + "/*.log"):
        with open(path, errors="replace") as f:
            for line in f:
                line = ANSI.sub("", line)
                m = LEASE.search(line)
                if not m:
                    continue
                for name, marker in STEPS:
                    if marker in line:
                        seen.setdefault(m.group(1), {}).setdefault(name, millis(line))
    names = [n for n, _ in STEPS]
    complete = [e for e in seen.values() if all(n in e for n in names)]
    if not complete:
        sys.exit(f"no lease with every step in {where}/*.log")
    print(f"{len(complete)} leases")
    for a, b in zip(names, names[1:]):
        d = [e[b] - e[a] for e in complete]
        print(f"{a + ' -> ' + b:24} median {statistics.median(d):7.3f} ms")


if __name__ == "__main__":
    main()
