#!/usr/bin/env python3
"""Control-plane flood (issue 15, defect 8): holds N half-sent PATCH heads
on the control plane and, once a second, probes /health on a fresh
connection and opens a stream on the stream plane, printing how long each
took and how many descriptors the gateway holds.

    streamline --control-addr 127.0.0.1:18080 --stream-addr 127.0.0.1:18081 &
    python3 bench/control_flood.py $! 2100 25

Loopback only; raises its own open-files limit to hold the flood.
"""
import os
import resource
import socket
import sys
import time

pid, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
control, stream = ("127.0.0.1", 18080), ("127.0.0.1", 18081)
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))


def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))


def probe(addr, request):
    start = time.time()
    try:
        s = socket.create_connection(addr, timeout=30)
        s.settimeout(30)
        s.send(request)
        line = s.recv(200).split(b"\r\n")[0].decode()
        s.close()
    except OSError as e:
        line = repr(e)
    return time.time() - start, line


print("gateway descriptors before:", fds())
t0 = time.time()
flood = []
for _ in range(n):
    s = socket.create_connection(control)
    s.send(b"PATCH /events HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    flood.append(s)
print(f"{n} half-sent heads open after {time.time() - t0:.1f}s; gateway descriptors {fds()}")
end = time.time() + hold
while time.time() < end:
    h = probe(control, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    st = probe(stream, b"GET /stream?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
    print(
        f"t={time.time() - t0:5.1f}s /health {h[1]!r} in {h[0] * 1000:.0f} ms; "
        f"stream {st[1]!r} in {st[0] * 1000:.0f} ms; gateway descriptors {fds()}"
    )
    time.sleep(1)
