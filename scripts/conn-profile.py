#!/usr/bin/env python3
"""What a connected agent costs the coordinator, by owner, in resident memory.

Runs `berth-bench p2` (P2's multiplexed run and its one-connection-per-agent
run) with every coordinator under heaptrack's allocation recorder. When a
coordinator's RSS has been steady for 1.5 s above --min-rss-mib (all agents
connected, heartbeats only, before the CI load) it reads which of its heap
pages are resident (/proc/PID/pagemap); afterwards it replays the recorded
allocations up to that moment and charges each resident byte to the
allocation that covers it, grouped by the code that allocated it. An
allocation whose pages were never written costs nothing: that is the
difference between the "allocated" and "resident" columns.

Usage (as root, after a release build of the bench and daemons):
    scripts/conn-profile.py [--min-rss-mib 60] [-- BERTH-BENCH P2 ARGS...]
Default bench arguments: p2 --p2-agents 10000 --p2-seconds 1 --p2-no-memory-store
Installs Debian's heaptrack if it is missing. Work files go to
/tmp/berth-conn-profile (a few hundred MB; removed at the end).
"""

import argparse
import collections
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/tmp/berth-conn-profile"
PRELOAD = "/usr/lib/heaptrack/libheaptrack_preload.so"
INTERPRET = "/usr/lib/heaptrack/libexec/heaptrack_interpret"

# First match wins; matched against the whole allocating stack, root first.
CATEGORIES = [
    ("h2 write buffer (FramedWrite, 16 KiB)", r"FramedWrite<T, B>>::new|FramedWrite\$LT\$T\$C\$B\$GT\$::new"),
    ("h2 read buffer (tokio-util FramedRead, 8 KiB)", r"ReadFrame"),
    ("h2 HPACK decoder scratch buffer (4 KiB)", r"FrameDecoder>::new|FrameDecoder::new"),
    ("rustls record read buffer (4 KiB)", r"DeframerVecBuffer"),
    ("rustls connection state, keys", r"rustls"),
    # The second form: the size-optimised release build inlines tonic's
    # accept loop into serve_pool, which boxes each connection's task.
    ("connection task (tonic: hyper + h2 + TLS stream)",
     r"serve_connection.*bind_new_task|serve_pool[^;]*;[^;]*PollFn[^;]*;[^;]*;[^;]*box_new_uninit"),
    ("h2 HPACK tables", r"hpack"),
    ("h2 stream store and frame queues", r"h2::proto::streams"),
    ("h2 other", r"h2::"),
    ("berth agent stream: outgoing channel", r"api::agent.*mpsc.*channel"),
    ("berth pool", r"berth_coordinator::pool"),
    ("berth agent stream: other", r"berth_coordinator::api"),
    ("tonic (per-stream codec buffers, handler)", r"tonic"),
    ("hyper (per-stream task)", r"hyper"),
    ("tokio (socket registration, timers)", r"tokio"),
    ("redb page cache (the lease store)", r"redb::"),
    ("other", r"."),
]


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def ensure_heaptrack():
    if os.path.exists(PRELOAD) and os.path.exists(INTERPRET):
        return
    subprocess.run(["apt-get", "install", "-y", "heaptrack"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def coordinators(exe):
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv0 = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0]
        except OSError:
            continue
        if argv0 == exe.encode():
            out.append(int(p))
    return out


def elapsed_ms(pid):
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    start = int(stat[19]) * 1000 / os.sysconf("SC_CLK_TCK")
    return float(open("/proc/uptime").read().split()[0]) * 1000 - start


def snapshot(pid):
    """Resident pages of the heap and of anonymous mappings (glibc's arenas)."""
    t = elapsed_ms(pid)
    pages = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in open(f"/proc/{pid}/maps"):
            f = line.split()
            if "rw" not in f[1] or (len(f) > 5 and f[5] != "[heap]"):
                continue
            a, b = (int(x, 16) for x in f[0].split("-"))
            pm.seek(a // 4096 * 8)
            data = pm.read((b - a) // 4096 * 8)
            for i in range(len(data) // 8):
                (e,) = struct.unpack_from("<Q", data, i * 8)
                if e >> 63:
                    pages.append(a // 4096 + i)
    return {"pid": pid, "t_ms": t, "rss_kib": rss_kib(pid), "pages": pages}


def watch(exe, min_kib, stop, snaps):
    hist, done = {}, set()
    while not stop.is_set():
        now = time.time()
        for pid in coordinators(exe):
            if pid in done:
                continue
            r = rss_kib(pid)
            if r is None:
                continue
            h = hist.setdefault(pid, [])
            h.append((now, r))
            recent = [x for (t, x) in h if t > now - 1.5]
            if r > min_kib and h[0][0] < now - 2 and min(recent) > 0.99 * max(recent):
                snaps.append(snapshot(pid))
                done.add(pid)
        time.sleep(0.1)


def analyze(raw, snap, show_other=0):
    interpreted = raw + ".int"
    with open(raw) as src, open(interpreted, "w") as dst:
        subprocess.run([INTERPRET], stdin=src, stdout=dst, check=True)
    strings, ips, traces = [None], [None], [None]
    for line in open(interpreted):
        if line.startswith("s "):
            rest = line[2:].rstrip("\n")
            strings.append(rest.split(" ", 1)[1] if " " in rest else "")
        elif line.startswith("i "):
            ips.append([int(x, 16) for x in line.split()[3::3]])
        elif line.startswith("t "):
            f = line.split()
            traces.append((int(f[1], 16), int(f[2], 16)))
    os.remove(interpreted)
    demangled = subprocess.run(["c++filt"], input="\n".join(s or "" for s in strings[1:]),
                               capture_output=True, text=True, check=True).stdout.split("\n")
    names = [None] + [re.sub(r"::h[0-9a-f]{16}", "", d) for d in demangled]
    cache = {}

    def category(t):
        if t not in cache:
            stack = ";".join(stack_of(traces, ips, names, t))
            cache[t] = next(name for name, rx in CATEGORIES if re.search(rx, stack))
        return cache[t]

    live = {}
    with open(raw) as f:
        for line in f:
            k = line[0]
            if k == "+":
                _, size, trace, ptr = line.split()
                live[int(ptr, 16)] = (int(size, 16), int(trace, 16))
            elif k == "-":
                live.pop(int(line[2:], 16), None)
            elif k == "c" and int(line[2:], 16) >= snap["t_ms"]:
                break
    resident_pages = set(snap["pages"])
    allocated, resident = collections.Counter(), collections.Counter()
    by_trace = collections.Counter()
    for ptr, (size, trace) in live.items():
        c = category(trace)
        allocated[c] += size
        page, end = ptr >> 12, ptr + size
        while (page << 12) < end:
            if page in resident_pages:
                n = min(end, (page + 1) << 12) - max(ptr, page << 12)
                resident[c] += n
                if c == "other":
                    by_trace[trace] += n
            page += 1
    # The biggest stacks nothing above claims, innermost frames last: what a
    # new category should match.
    others = [(n, stack_of(traces, ips, names, t)) for t, n in by_trace.most_common(show_other)]
    return allocated, resident, len(resident_pages) * 4096, others


def stack_of(traces, ips, names, t):
    frames, n = [], t
    while n:
        ip, parent = traces[n]
        frames.extend(reversed([names[i] if i else "?" for i in ips[ip]] if ip < len(ips) else []))
        n = parent
    return list(reversed(frames))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-rss-mib", type=int, default=60)
    ap.add_argument("--show-other", type=int, default=0, metavar="N",
                    help="print the N stacks with the most resident bytes in 'other'")
    ap.add_argument("bench", nargs="*")
    args = ap.parse_args()
    bench = args.bench or ["p2", "--p2-agents", "10000", "--p2-seconds", "1", "--p2-no-memory-store"]
    ensure_heaptrack()
    release = os.path.join(target_dir(), "release")
    real = os.path.join(release, "berth-coordinator")
    shutil.rmtree(WORK, ignore_errors=True)
    bindir = os.path.join(WORK, "bin")
    os.makedirs(bindir)
    os.symlink(os.path.join(release, "berth-agent"), os.path.join(bindir, "berth-agent"))
    wrapper = os.path.join(bindir, "berth-coordinator")
    with open(wrapper, "w") as w:
        w.write(f"#!/bin/sh\nLD_PRELOAD={PRELOAD} DUMP_HEAPTRACK_OUTPUT={WORK}/heap.$$ exec {real} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    stop, snaps = threading.Event(), []
    watcher = threading.Thread(target=watch, args=(real, args.min_rss_mib * 1024, stop, snaps))
    watcher.start()
    cmd = [os.path.join(release, "berth-bench")] + bench
    print("running", " ".join(cmd), flush=True)
    bench_out = subprocess.run(cmd, env={**os.environ, "BERTH_BIN_DIR": bindir},
                               capture_output=True, text=True)
    stop.set()
    watcher.join()
    if bench_out.returncode != 0:
        sys.exit(f"berth-bench failed:\n{bench_out.stdout}\n{bench_out.stderr}")
    agents = int(re.search(r"--p2-agents\s+(?:\S*,)?(\d+)", " ".join(bench)).group(1)) \
        if "--p2-agents" in bench else 10000
    results = []
    for snap in sorted(snaps, key=lambda s: s["pid"]):
        a, r, pages, others = analyze(os.path.join(WORK, f"heap.{snap['pid']}"), snap, args.show_other)
        results.append((snap, a, r, pages))
        for n, stack in others:
            print(f"\n'other' in coordinator {snap['pid']}: {n} resident bytes from")
            for frame in stack[-16:]:
                print(f"    {frame[:160]}")
    shutil.rmtree(WORK, ignore_errors=True)
    if len(results) != 2:
        sys.exit(f"expected two snapshots (multiplexed, one connection each), got {len(results)}")
    (s1, a1, r1, p1), (s2, a2, r2, p2) = results
    n = agents
    print(f"\nbytes per agent, {n} agents: multiplexed (250 per connection) vs one TLS connection each;"
          " allocated = live heap, resident = of it in resident pages")
    print(f"{'owner':52s} {'mux alloc':>9s} {'mux res':>8s} {'1c alloc':>9s} {'1c res':>8s} {'+res/conn':>9s}")
    for name, _ in CATEGORIES:
        print(f"{name:52s} {a1[name] / n:9.0f} {r1[name] / n:8.0f} {a2[name] / n:9.0f} {r2[name] / n:8.0f}"
              f" {(r2[name] - r1[name]) / n:9.0f}")
    t = [sum(x.values()) for x in (a1, r1, a2, r2)]
    print(f"{'all live allocations':52s} {t[0] / n:9.0f} {t[1] / n:8.0f} {t[2] / n:9.0f} {t[3] / n:8.0f}"
          f" {(t[3] - t[1]) / n:9.0f}")
    f1, f2 = p1 - t[1], p2 - t[3]
    print(f"{'resident heap bytes outside live allocations':52s} {'':9s} {f1 / n:8.0f} {'':9s} {f2 / n:8.0f}"
          f" {(f2 - f1) / n:9.0f}")
    print(f"VmRSS at the snapshot: {s1['rss_kib']} KiB and {s2['rss_kib']} KiB"
          f" ({(s2['rss_kib'] - s1['rss_kib']) * 1024 / n:.0f} bytes per agent apart)")


if __name__ == "__main__":
    main()
