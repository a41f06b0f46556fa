#!/usr/bin/env python3
"""What permessage-deflate costs per connection, with and without context takeover.

    pip install websockets     # 13 or newer
    python3 bench/deflate_memory.py target/release/switchboard [-n 1000]

For each server configuration (compression off; on with no_context_takeover, the
default; on with context takeover) it starts a fresh server, opens N connections
that offer permessage-deflate (the `websockets` library's default offer, like a
browser's), subscribes each to one channel, publishes a few compressible 2 KB
messages that every connection receives and each connection also sends one
compressed request, then reports the server's VmRSS growth per connection. Loopback
only; bounded by N and a timeout. Not a test: it prints figures for BENCHMARKS.md.
"""

import argparse
import asyncio
import json
import socket
import subprocess
import time

import websockets


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def scenario(binary, n, flags):
    port = free_port()
    server = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--demo", "false",
         "--rate-limit", "0", "--handshake-rate", "0", "--log", "warn", *flags])
    try:
        url = f"ws://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                async with websockets.connect(url) as ws:
                    await ws.recv()
                break
            except OSError:
                await asyncio.sleep(0.1)
        before = rss_kib(server.pid)
        conns = []
        for i in range(n):
            ws = await websockets.connect(url, max_size=None)
            await ws.recv()  # connected
            await ws.send(json.dumps({"type": "subscribe", "channel": "bench", "id": i}))
            await ws.recv()  # subscribed
            conns.append(ws)
        negotiated = conns[0].response.headers.get("Sec-WebSocket-Extensions", "")
        payload = {"text": "the quick brown fox jumps over the lazy dog " * 45}
        for k in range(3):
            await conns[0].send(json.dumps(
                {"type": "publish", "channel": "bench", "data": payload, "id": f"p{k}"}))
        # Every connection sends one request of its own (compressed when the
        # client compresses: the server inflates it).
        await asyncio.gather(*(
            ws.send(json.dumps({"type": "ping", "id": "x" * 200})) for ws in conns))

        async def drain(ws, want):
            got = 0
            while got < want:
                m = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if m.get("type") in ("message", "pong"):
                    got += 1
        await asyncio.gather(*(drain(ws, 3 + 1) for ws in conns[1:]))
        await asyncio.sleep(2)
        after = rss_kib(server.pid)
        for ws in conns:
            await ws.close()
        return negotiated, (after - before) / n
    finally:
        server.terminate()
        server.wait(10)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    configs = [
        ("compression off", []),
        ("deflate, no_context_takeover (default)", ["--compression", "true"]),
        ("deflate, context takeover", ["--compression", "true",
                                       "--compression-context-takeover", "true"]),
    ]
    print(f"{args.n} connections, each received 3 x 2 KB publications and sent 1 request")
    for name, flags in configs:
        t = time.time()
        negotiated, per = await asyncio.wait_for(scenario(args.binary, args.n, flags), 300)
        print(f"  {name:42} {per:8.2f} KiB/conn   ({negotiated or 'no extension'};"
              f" {time.time() - t:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
