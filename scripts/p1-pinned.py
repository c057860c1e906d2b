#!/usr/bin/env python3
"""P1 with the coordinator and its client on a core of their own.

Runs `berth-bench p1` on CPU 1, so the agents it starts and their dockerds
stay there; once the coordinator and every agent are up, moves every
thread of the coordinator and of the bench (the CI client) to CPU 0
(`taskset`): acquires and their round trips then never wait for a core
behind the hosts' dockerd restarts. Prints the bench's own output; compare
it with the same `berth-bench p1` run as usual.

Usage (as root, after a release build of the bench and daemons):
    scripts/p1-pinned.py [-- BERTH-BENCH P1 ARGS...]
Default bench arguments: p1 --p1-cycles 300
Binaries come from BERTH_BIN_DIR, else $CARGO_TARGET_DIR/release (or
target/release).
"""

import importlib.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "commit_profile", os.path.join(HERE, "commit-profile.py"))
profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    bench = args or ["p1", "--p1-cycles", "300"]
    if (os.cpu_count() or 1) < 2:
        sys.exit("p1-pinned: needs two CPUs (0 for the coordinator, 1 for the rest)")
    bins = profile.bin_dir()
    tag = os.environ.get("BERTH_TEST_TAG", "")
    state_dir = f"/tmp/berth-t/{tag}{profile.SCENARIO}/"
    env = {**os.environ, "BERTH_BIN_DIR": bins}
    run = subprocess.Popen(
        ["taskset", "-c", "1", os.path.join(bins, "berth-bench")] + bench, env=env)
    pid = profile.coordinator_pid(state_dir, time.monotonic() + 120)
    if pid is None:
        run.kill()
        sys.exit(f"p1-pinned: no berth-coordinator with {state_dir} on its command line within 120 s")
    agents = int(bench[bench.index("--p1-agents") + 1]) if "--p1-agents" in bench else 3
    deadline = time.monotonic() + 120
    while len(profile.pids_of("berth-agent", state_dir)) < agents:
        if time.monotonic() > deadline or run.poll() is not None:
            run.kill()
            sys.exit(f"p1-pinned: {agents} berth-agent processes did not start")
        time.sleep(0.05)
    for p in (pid, run.pid):
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(p)], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"p1-pinned: coordinator {pid} and the bench {run.pid} on CPU 0, "
          f"{agents} agents and their dockerds on CPU 1", file=sys.stderr, flush=True)
    sys.exit(run.wait())


if __name__ == "__main__":
    main()
