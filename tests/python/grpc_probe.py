#!/usr/bin/env python3
"""A gRPC client that is not berth's own (Python grpcio), for the ops tests.

Usage: grpc_probe.py ADDR CA_PEM

Prints `health SERVICE STATUS` for the overall health and for each berth
service, then `reflection SERVICE` for every service the server's
reflection (grpc.reflection.v1) lists. Exits non-zero if a call fails.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BERTH_SERVICES = [
    "berth.v1.LeaseService",
    "berth.v1.AgentService",
    "berth.v1.AdminService",
]


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def fields(buf):
    """(field number, bytes) of the length-delimited fields of a message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            n, i = varint(buf, i)
            yield number, buf[i:i + n]
            i += n
        elif wire == 0:
            _, i = varint(buf, i)
        else:
            raise ValueError(f"unexpected wire type {wire}")


def reflection_services(channel):
    # ServerReflectionRequest { list_services = "" } is field 7, empty.
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    names = []
    for response in call(iter([b"\x3a\x00"]), timeout=10):
        for number, body in fields(response):
            if number == 6:  # list_services_response
                for n2, service in fields(body):
                    if n2 == 1:  # service
                        for n3, name in fields(service):
                            if n3 == 1:
                                names.append(name.decode())
    return names


def main():
    addr, ca_path = sys.argv[1], sys.argv[2]
    with open(ca_path, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(addr, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in [""] + BERTH_SERVICES:
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            print(f"health {service or '(server)'} {status}")
        for name in reflection_services(channel):
            print(f"reflection {name}")


if __name__ == "__main__":
    main()
