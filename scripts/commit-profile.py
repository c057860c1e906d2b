#!/usr/bin/env python3
"""What the coordinator's store commits cost while P1 runs.

Runs `berth-bench p1` and traces its coordinator's writes to the store with
strace (pwrite, fdatasync, fsync; every thread, with timestamps and each
call's duration). Prints P1's closing table, then per commit (one
fdatasync or fsync): how many page writes and bytes it carried, how long
the sync took, and how long from the commit's first write to the end of
its sync. strace stops the traced thread at every system call, so the last
figure is an upper bound; the sync's own duration is the kernel's.

Usage (as root, after a release build of the bench and daemons):
    scripts/commit-profile.py [-- BERTH-BENCH P1 ARGS...]
Default bench arguments: p1 --p1-cycles 100 --p1-agents 1
Binaries come from BERTH_BIN_DIR, else $CARGO_TARGET_DIR/release (or
target/release). Installs Debian's strace if it is missing. The trace goes
to /tmp/berth-commit-profile.txt (kept for reading).
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = "/tmp/berth-commit-profile.txt"
# P1's scenario prefix (tests/src/bench/latency.rs), after BERTH_TEST_TAG.
SCENARIO = "bn1"


def bin_dir():
    if os.environ.get("BERTH_BIN_DIR"):
        return os.environ["BERTH_BIN_DIR"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release")


def pids_of(binary, state_dir):
    """The processes of `binary` whose command line names `state_dir`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(binary.encode()) and \
                any(state_dir.encode() in a for a in cmd):
            pids.append(int(pid))
    return pids


def coordinator_pid(state_dir, deadline):
    """The coordinator whose command line names P1's state directory."""
    while time.monotonic() < deadline:
        pids = pids_of("berth-coordinator", state_dir)
        if pids:
            return pids[0]
        time.sleep(0.05)
    return None


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def main():
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    bench = args or ["p1", "--p1-cycles", "100", "--p1-agents", "1"]
    if shutil.which("strace") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    bins = bin_dir()
    tag = os.environ.get("BERTH_TEST_TAG", "")
    state_dir = f"/tmp/berth-t/{tag}{SCENARIO}/"
    env = {**os.environ, "BERTH_BIN_DIR": bins}
    run = subprocess.Popen([os.path.join(bins, "berth-bench")] + bench, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = coordinator_pid(state_dir, time.monotonic() + 120)
    if pid is None:
        run.kill()
        sys.exit(f"no berth-coordinator with {state_dir} on its command line within 120 s:\n"
                 + run.communicate()[0])
    strace = subprocess.Popen(["strace", "-f", "-tt", "-T", "-o", TRACE, "-p", str(pid),
                               "-e", "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync"],
                              stderr=subprocess.DEVNULL)
    out = run.communicate()[0]
    strace.wait(timeout=60)
    if run.returncode != 0:
        sys.exit(f"berth-bench failed:\n{out}")
    table = out[out.rfind("figure "):]
    print(table.rstrip())
    report(open(TRACE).read().splitlines())


LINE = re.compile(r"^(\d+)\s+(\d+):(\d+):([\d.]+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+).*<([\d.]+)>$")


def report(lines):
    # Per thread: the writes since its last sync.
    pending = {}
    commits = []
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        tid, call = m.group(1), m.group(5)
        at = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
        ret, took = int(m.group(7)), float(m.group(8))
        if call.startswith("pwrite"):
            pending.setdefault(tid, []).append((at, max(ret, 0)))
        elif call in ("fdatasync", "fsync"):
            writes = pending.pop(tid, [])
            start = writes[0][0] if writes else at
            commits.append({
                "writes": len(writes),
                "bytes": sum(b for _, b in writes),
                "sync_ms": took * 1e3,
                "commit_ms": (at + took - start) * 1e3,
            })
    if not commits:
        sys.exit(f"no sync in the trace ({TRACE})")
    n = len(commits)
    print(f"\nstore commits traced: {n} (trace: {TRACE})")
    for key, unit in (("writes", ""), ("bytes", " B"), ("sync_ms", " ms"), ("commit_ms", " ms")):
        v = [c[key] for c in commits]
        fmt = (lambda x: f"{x:.3f}") if key.endswith("_ms") else (lambda x: f"{x:.0f}")
        print(f"  {key:<10} median {fmt(statistics.median(v))}{unit}  p90 {fmt(pct(v, 0.9))}{unit}"
              f"  max {fmt(max(v))}{unit}")
    counts = {}
    for c in commits:
        counts[c["writes"]] = counts.get(c["writes"], 0) + 1
    print("  writes per commit: " + ", ".join(
        f"{k}: {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
