#!/usr/bin/env python3
"""Testcontainers for Python, unchanged, against a berth lease, Ryuk on.

Usage: testcontainers_probe.py IMAGE

Starts a `DockerContainer(IMAGE)` exposing port 80 (the image serves HTTP
there), reaches it at `get_container_host_ip()`:`get_exposed_port(80)` (no
TESTCONTAINERS_HOST_OVERRIDE: the host comes from DOCKER_HOST), and prints
one JSON line: the container id, the host and port used, the body, and the
session id Ryuk was given. Then it ends the way a killed CI job does, with
no clean-up of its own (`os._exit`): removing the container is Ryuk's job
once the session's connection closes. (A normal exit removes the Ryuk
container itself first, through atexit, so Ryuk would have nothing to do.)
"""

import json
import os
import sys
import time
import urllib.request

from testcontainers.core.container import DockerContainer
from testcontainers.core.labels import SESSION_ID


def main():
    image = sys.argv[1]
    container = DockerContainer(image).with_exposed_ports(80)
    container.start()
    host = container.get_container_host_ip()
    port = int(container.get_exposed_port(80))
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as r:
                body = r.read().decode()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    print(
        json.dumps(
            {
                "container_id": container.get_wrapped_container().id,
                "host": host,
                "port": port,
                "body": body,
                "session": SESSION_ID,
            }
        ),
        flush=True,
    )
    os._exit(0)


if __name__ == "__main__":
    main()
