#!/usr/bin/env python3
"""What "acked means replicated" costs a publish on a Redis Cluster.

    python3 bench/cluster_publish.py --bin target/release/switchboard

Two private Redis Clusters of 3 masters on free loopback ports, started and
stopped here: one with a replica per master (each publish waits for its
replica, `WAIT 1` in the publish pipeline: src/broker/redis/replication.rs)
and one without replicas (nothing to wait for: the same binary acks as soon
as the master has it). For each, one switchboard instance on the cluster and:

* sequential: `--sequential` publishes over `POST /api/publish`, one at a
  time on one keep-alive connection, round-robin over 100 channels: the
  ack latency (p50, p99);
* concurrent: `--threads` threads, each on its own keep-alive connection,
  `--per-thread` publishes each over the same channels: acks per second
  (the Python client is part of what is measured: compare the two rows,
  not the absolute figure);
* saturated, with `--bench-bin` (target/release/switchboard-bench): 4
  WebSocket publishers on one channel (one slot, one master: where the
  waits queue on one connection), 10 subscribers, 5 s,
  `fanout --mode channel --saturate`: publications per second and p99
  delivery latency.

Every publish must be acked (HTTP 200), else the run fails. Standard
library only; loopback only; every wait is bounded; every process started
here is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

API_KEY = "cluster-publish-bench-key-0123456789"
CHANNELS = 100


def log(msg: str) -> None:
    print(f"[cluster_publish {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_port() -> int:
    """A free port for a cluster node: at most 55535 (its cluster bus port,
    10,000 higher, must exist too) and free with that bus port."""
    import random
    for _ in range(1000):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    sys.exit("cluster_publish: no free port pair for a cluster node")


def cli(port: int, *args: str) -> str:
    r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
    return r.stdout


def start_cluster(workdir: str, replicas: int, procs: list) -> list[int]:
    ports = [node_port() for _ in range(3 * (1 + replicas))]
    for port in ports:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
             "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    for port in ports:
        while "PONG" not in cli(port, "ping"):
            if time.monotonic() > deadline:
                sys.exit(f"cluster_publish: redis-server on {port} did not start")
            time.sleep(0.05)
    out = subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
         "--cluster-replicas", str(replicas), "--cluster-yes"],
        capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(f"cluster_publish: redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
    # Healthy: every node ok, and each master's replica online.
    while True:
        ok = all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports)
        online = sum("state=online" in cli(p, "info", "replication") for p in ports)
        if ok and online >= 3 * replicas:
            return ports
        if time.monotonic() > deadline + 30:
            sys.exit("cluster_publish: the cluster did not become healthy")
        time.sleep(0.1)


def start_instance(args, workdir: str, ports: list[int], procs: list) -> int:
    port = free_port()
    key_file = os.path.join(workdir, "api-key")
    with open(key_file, "w") as f:
        f.write(API_KEY)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    logfile = open(os.path.join(workdir, "switchboard.log"), "wb")
    procs.append(subprocess.Popen(
        [args.bin, "--host", "127.0.0.1", "--port", str(port), "--bus", url,
         "--api-key-file", key_file, "--demo", "false", "--drain-timeout", "2s",
         "--rate-limit", "0"],
        stdout=logfile, stderr=subprocess.STDOUT))
    logfile.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if request(http.client.HTTPConnection("127.0.0.1", port, timeout=2), "GET", "/readyz")[0] == 200:
                return port
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"cluster_publish: switchboard not ready within 30 s (log in {workdir})")


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None):
    headers = {"X-API-Key": API_KEY}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def publish_many(port: int, n: int, start: int, latencies: list[float] | None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(start, start + n):
        t = time.perf_counter()
        status, body = request(conn, "POST", "/api/publish", {"channel": f"bench:{i % CHANNELS}", "data": i})
        if status != 200:
            raise RuntimeError(f"publish {i}: {status} {body!r}")
        if latencies is not None:
            latencies.append(time.perf_counter() - t)
    conn.close()


def measure(args, replicas: int) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"sb-cluster-publish-{replicas}-")
    procs: list[subprocess.Popen] = []
    try:
        ports = start_cluster(workdir, replicas, procs)
        port = start_instance(args, workdir, ports, procs)
        publish_many(port, CHANNELS, 0, None)  # warm-up: every channel's stream exists
        lat: list[float] = []
        publish_many(port, args.sequential, CHANNELS, lat)
        lat.sort()
        errors: list[str] = []

        def worker(k: int) -> None:
            try:
                publish_many(port, args.per_thread, 10_000_000 * (k + 1), None)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.threads)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        elapsed = time.perf_counter() - t
        if errors:
            raise RuntimeError(f"{len(errors)} threads failed, first: {errors[0]}")
        row = {}
        if args.bench_bin:
            out = os.path.join(workdir, "fanout.json")
            r = subprocess.run(
                [args.bench_bin, "fanout", "--url", f"ws://127.0.0.1:{port}/ws", "--mode", "channel",
                 "--saturate", "--publishers", str(args.ws_publishers), "--subscribers", "10", "--duration", "5",
                 "--json", out],
                capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"fanout failed: {r.stdout}{r.stderr}")
            with open(out) as f:
                fan = json.load(f)
            print(json.dumps({k: fan[k] for k in ("sent", "expected", "received", "lost", "receivers_with_loss", "max_lost_by_one_receiver", "closes", "disconnects", "error_frames", "other_frames", "publish_per_sec")}), file=sys.stderr)
            if fan["lost"] or fan["duplicates"] or fan["out_of_order"]:
                raise RuntimeError(f"fanout: lost {fan['lost']}, twice {fan['duplicates']}, reordered {fan['out_of_order']}")
            row = {"saturated_pub_s": fan["publish_per_sec"], "saturated_p99_ms": fan["latency"]["p99_us"] / 1000}
        return row | {
            "replicas": replicas,
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
            "acks_per_s": args.threads * args.per_thread / elapsed,
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/switchboard")
    ap.add_argument("--sequential", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--per-thread", type=int, default=500)
    ap.add_argument("--ws-publishers", type=int, default=16)
    ap.add_argument("--bench-bin", default=None, help="target/release/switchboard-bench, for the saturated run")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        ap.error(f"no switchboard binary at {args.bin}")
    if shutil.which("redis-server") is None:
        sys.exit("cluster_publish: redis-server (≥ 7) is needed: apt-get install redis-server")
    rows = []
    for replicas in (1, 0):
        log(f"cluster with {replicas} replica(s) per master")
        rows.append(measure(args, replicas))
    print(f"| cluster | API ack p50 | p99 | API acks/s, {args.threads} publishers | "
          "WebSocket publications/s, saturated, one channel | its delivery p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "3 masters + 3 replicas (waits)" if r["replicas"] else "3 masters, no replica (no wait)"
        sat = (f"{r['saturated_pub_s']:,.0f} | {r['saturated_p99_ms']:.2f} ms"
               if "saturated_pub_s" in r else "– | –")
        print(f"| {name} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['acks_per_s']:,.0f} | {sat} |")


if __name__ == "__main__":
    main()
