#!/usr/bin/env python3
"""The Python Docker SDK (docker-py), unchanged, against a berth lease.

Usage: docker_sdk_probe.py BUILD_CONTEXT

`docker.from_env()` reads DOCKER_HOST, DOCKER_TLS_VERIFY and
DOCKER_CERT_PATH exactly as `berth acquire` exports them. Then: build an
image from BUILD_CONTEXT (a busybox image FROM scratch), run a container
and read its output, start one detached, read its logs, exec in it, copy a
file into it with put_archive and read it back. Prints one line per step
(`STEP value`); any failure raises and exits non-zero.
"""

import io
import sys
import tarfile
import time

import docker

IMAGE = "sdk-probe:1"


def main():
    context = sys.argv[1]
    client = docker.from_env()
    print("version", client.version()["Version"], flush=True)

    image, _ = client.images.build(path=context, tag=IMAGE, rm=True)
    print("build", image.id, flush=True)

    out = client.containers.run(IMAGE, ["echo", "hello from run"], remove=True)
    assert out == b"hello from run\n", out
    print("run", out.decode().strip(), flush=True)

    c = client.containers.run(
        IMAGE, ["sh", "-c", "echo started; exec sleep 300"], detach=True, name="sdk-probe"
    )
    try:
        deadline = time.time() + 30
        while b"started" not in c.logs():
            assert time.time() < deadline, "no log line from the detached container"
            time.sleep(0.2)
        print("logs", c.logs().decode().strip(), flush=True)

        code, output = c.exec_run(["cat", "/www/index.html"])
        assert code == 0, (code, output)
        print("exec", output.decode().strip(), flush=True)

        payload = b"put through the SDK\n"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("note.txt")
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
        assert c.put_archive("/", buf.getvalue()), "put_archive refused"
        code, output = c.exec_run(["cat", "/note.txt"])
        assert code == 0 and output == payload, (code, output)
        print("put_archive", output.decode().strip(), flush=True)
    finally:
        c.remove(force=True)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
