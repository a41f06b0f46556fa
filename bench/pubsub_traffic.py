#!/usr/bin/env python3
"""What an instance receives from the Pub/Sub bus when it serves 1 of 100 busy channels.

Run by bench/pubsub_traffic.sh (which builds on --build and checks the
emulator); usable on its own:

    python3 bench/pubsub_traffic.py --bin target/release/switchboard

For each layout (`--pubsub-shards 1`, every channel on one topic as in the
old design, and `32`, the default) on a private Pub/Sub emulator:

* instance A and instance B, fresh topic and subscription names;
* one WebSocket subscriber on B, subscribed to `busy-0`;
* a publisher posting to A's `POST /api/publish` round-robin over
  `busy-0..busy-99` at a fixed total rate (after one warm-up publication
  per channel, so the channels' sequencer claims are behind us);
* both instances' `/metrics` read before and after the timed run: the
  table shows what each instance received from the bus over that run
  (`busReceivedMessages`, `busReceivedBytes`) and its `busSubscriptions`.

The subscriber must get exactly the publications acknowledged on
`busy-0` (each once, offsets contiguous), else the run fails. Standard
library only; loopback only; every wait is bounded, and every process
started here is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

EMULATOR_BIN = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
INSTALL_HINT = (
    "install it with `apt-get install google-cloud-cli-pubsub-emulator "
    "openjdk-17-jre-headless` (the emulator package comes from Google's Cloud "
    "SDK apt repository)"
)
CHANNELS = 100
API_KEY = "pubsub-traffic-bench-key-0123456789"


def log(msg: str) -> None:
    print(f"[pubsub_traffic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_of(channel: str, count: int) -> int:
    """The server's channel -> shard mapping (src/broker/pubsub/shards.rs)."""
    h = 0xCBF29CE484222325
    for b in channel.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    return h % max(count, 1)


class Procs:
    """Every process this script starts, stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], logfile: str) -> subprocess.Popen:
        out = open(logfile, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs = [(n, q) for (n, q) in self.procs if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.procs)):
            self.stop(p)


def start_emulator(procs: Procs, workdir: str, timeout: float = 90.0) -> int:
    if not os.access(EMULATOR_BIN, os.X_OK):
        sys.exit(f"pubsub_traffic: the Pub/Sub emulator is missing ({EMULATOR_BIN}): {INSTALL_HINT}")
    port = free_port()
    path = os.path.join(workdir, "emulator.log")
    p = procs.start("emulator", [EMULATOR_BIN, "--host=127.0.0.1", f"--port={port}"], path)
    ready = f"Server started, listening on {port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            text = f.read()
        if ready in text:
            return port
        if p.poll() is not None:
            sys.exit(f"pubsub_traffic: the emulator exited ({p.returncode}) before it was ready "
                     f"(is Java installed? {INSTALL_HINT}):\n{text}")
        time.sleep(0.1)
    sys.exit(f"pubsub_traffic: the emulator was not ready within {timeout:.0f} s (log: {path})")


def http_json(port: int, method: str, path: str, body: object = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"X-API-Key": API_KEY}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw) if raw else None
        except ValueError:
            return r.status, raw.decode(errors="replace")
    finally:
        conn.close()


def wait_ready(port: int, proc: subprocess.Popen, logfile: str, timeout: float = 60.0) -> None:
    """`/readyz` 200 and the bus up (`/healthz`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"pubsub_traffic: switchboard on port {port} exited ({proc.returncode}); log: {logfile}")
        try:
            status, _ = http_json(port, "GET", "/readyz", timeout=2)
            if status == 200:
                _, health = http_json(port, "GET", "/healthz", timeout=2)
                if isinstance(health, dict) and health.get("bus", {}).get("up"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"pubsub_traffic: switchboard on port {port} not ready with its bus up within {timeout:.0f} s; log: {logfile}")


FIGURES = ("busReceivedMessages", "busReceivedBytes", "busSubscriptions", "messagesOut")


def metrics(port: int) -> dict:
    status, m = http_json(port, "GET", "/metrics")
    if status != 200 or not isinstance(m, dict):
        raise RuntimeError(f"/metrics on port {port}: {status} {m!r}")
    missing = [k for k in FIGURES if k not in m]
    if missing:
        raise RuntimeError(f"/metrics on port {port} lacks {missing} (a build without bus traffic figures?)")
    return {k: m[k] for k in FIGURES}


class WsSubscriber:
    """A minimal WebSocket client (RFC 6455, no extensions) that counts the
    `message` frames of one channel and checks their offsets."""

    def __init__(self, port: int, channel: str) -> None:
        self.channel = channel
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("WebSocket: closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"WebSocket handshake refused: {head.decode(errors='replace')}")
        self.lock = threading.Lock()
        self.count = 0
        self.offsets: list[int] = []
        self.subscribed = threading.Event()
        self.error: str | None = None
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._send(0x1, json.dumps({"type": "subscribe", "channel": channel, "id": 1}).encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self.lock:
            self.sock.sendall(head + mask + masked)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self) -> None:
        self.sock.settimeout(None)
        frag = b""
        try:
            while True:
                b0, b1 = self._need(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._need(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._need(8))[0]
                payload = self._need(n)
                if opcode == 0x9:
                    self._send(0xA, payload)
                    continue
                if opcode == 0x8:
                    if not self.closed:
                        self.error = f"closed by the server: {payload[:2].hex()} {payload[2:].decode(errors='replace')}"
                    return
                if opcode in (0x1, 0x0):
                    frag += payload
                    if not b0 & 0x80:
                        continue
                    self._frame(json.loads(frag))
                    frag = b""
        except (EOFError, OSError) as e:
            if not self.closed:
                self.error = f"connection lost: {e!r}"

    def _frame(self, f: dict) -> None:
        t = f.get("type")
        if t == "subscribed" and f.get("channel") == self.channel:
            self.subscribed.set()
        elif t == "message" and f.get("channel") == self.channel:
            with self.lock:
                self.count += 1
                self.offsets.append(f.get("offset"))
        elif t == "error":
            self.error = f"error frame: {f}"

    def received(self) -> int:
        with self.lock:
            return self.count

    def check(self) -> str | None:
        """None when the offsets are distinct and contiguous."""
        with self.lock:
            offs = list(self.offsets)
        if not offs:
            return None
        if len(set(offs)) != len(offs):
            return f"{len(offs) - len(set(offs))} repeated offsets"
        if sorted(offs) != list(range(min(offs), min(offs) + len(offs))):
            return "offsets not contiguous"
        return None

    def close(self) -> None:
        self.closed = True
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def publish(port: int, total: int, rate: float, payload: int, workers: int, deadline_s: float) -> dict:
    """`total` publications over A's HTTP API, message i to `busy-(i % 100)`
    due at i / rate s from the start; `workers` keep-alive connections. New
    messages stop being taken `deadline_s` after the start."""
    acked = [0] * CHANNELS
    failures: list[str] = []
    state = {"next": 0}
    lock = threading.Lock()
    t0 = time.monotonic() + 0.05
    stop_at = t0 + deadline_s
    lat: list[float] = []

    def worker() -> None:
        conn = None
        while True:
            with lock:
                i = state["next"]
                if i >= total or time.monotonic() > stop_at:
                    break
                state["next"] = i + 1
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ch = i % CHANNELS
            data = json.dumps({"i": i, "pad": ""}, separators=(",", ":"))
            data = data[:-2] + "x" * max(0, payload - len(data)) + '"}'
            body = f'{{"channel":"busy-{ch}","data":{data}}}'.encode()
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                conn.request("POST", "/api/publish", body=body,
                             headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
                if r.status == 200:
                    with lock:
                        acked[ch] += 1
                        lat.append(time.monotonic() - start)
                else:
                    with lock:
                        failures.append(f"{r.status} {raw[:200].decode(errors='replace')}")
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    failures.append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 30)
    elapsed = time.monotonic() - t0
    lat.sort()
    return {
        "attempted": state["next"],
        "acked": sum(acked),
        "ackedPerChannel": acked,
        "failures": len(failures),
        "failureSamples": failures[:5],
        "seconds": round(elapsed, 2),
        "ratePerSecond": round(sum(acked) / elapsed, 1) if elapsed > 0 else 0,
        "ackLatencyMs": {
            "p50": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "p99": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
            "max": round(lat[-1] * 1000, 1) if lat else None,
        },
    }


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def run_layout(args, procs: Procs, emu_port: int, shards: int, run_id: str, workdir: str) -> dict:
    topic = f"sbtraffic-{run_id}-s{shards}"
    bus = f"pubsub://switchboard-bench?emulator=127.0.0.1:{emu_port}"
    key_file = os.path.join(workdir, "api-key")
    with open(key_file, "w") as f:
        f.write(API_KEY)
    inst = {}
    for name in ("A", "B"):
        port = free_port()
        logfile = os.path.join(workdir, f"s{shards}-{name}.log")
        argv = [
            args.bin, "--host", "127.0.0.1", "--port", str(port),
            "--instance-id", f"bench-{name.lower()}-{run_id}-s{shards}",
            "--bus", bus, "--pubsub-topic", topic,
            "--pubsub-subscription", f"{topic}-{name.lower()}",
            "--pubsub-shards", str(shards),
            "--api-key-file", key_file, "--demo", "false", "--drain-timeout", "2s",
        ]
        p = procs.start(f"switchboard-{name}", argv, logfile)
        inst[name] = {"port": port, "proc": p, "log": logfile, "argv": argv}
    for name in ("A", "B"):
        wait_ready(inst[name]["port"], inst[name]["proc"], inst[name]["log"])
    log(f"shards={shards}: A on :{inst['A']['port']}, B on :{inst['B']['port']}, topic {topic}")

    sub = WsSubscriber(inst["B"]["port"], "busy-0")
    try:
        if not sub.subscribed.wait(15):
            raise RuntimeError(f"the subscriber on B got no `subscribed` for busy-0 ({sub.error})")
        # Warm-up: one publication per channel, so each channel's sequencer
        # claim (and A's shard subscriptions) is done before the timed run.
        warm = publish(inst["A"]["port"], CHANNELS, args.rate, args.payload, args.workers, 30)
        if warm["failures"]:
            raise RuntimeError(f"warm-up publications failed: {warm['failureSamples']}")
        wait_for(lambda: sub.received() >= warm["ackedPerChannel"][0], 10)
        time.sleep(args.settle)
        before = {n: metrics(inst[n]["port"]) for n in ("A", "B")}
        total = int(args.rate * args.seconds)
        log(f"shards={shards}: publishing {total} messages to {CHANNELS} channels at {args.rate:g}/s")
        run = publish(inst["A"]["port"], total, args.rate, args.payload, args.workers, args.seconds + 20)
        expected = warm["ackedPerChannel"][0] + run["ackedPerChannel"][0]
        wait_for(lambda: sub.received() >= expected, 15)
        time.sleep(args.settle)
        after = {n: metrics(inst[n]["port"]) for n in ("A", "B")}
        got = sub.received()
        problem = sub.check() or sub.error
    finally:
        sub.close()
    for name in ("B", "A"):
        procs.stop(inst[name]["proc"])

    k0 = shard_of("busy-0", shards)
    same_shard = [c for c in range(CHANNELS) if shard_of(f"busy-{c}", shards) == k0]
    figures = {}
    for n in ("A", "B"):
        figures[n] = {
            "messages": after[n]["busReceivedMessages"] - before[n]["busReceivedMessages"],
            "bytes": after[n]["busReceivedBytes"] - before[n]["busReceivedBytes"],
            "subscriptions": after[n]["busSubscriptions"],
            "messagesOut": after[n]["messagesOut"] - before[n]["messagesOut"],
            "totalSinceStart": {"messages": after[n]["busReceivedMessages"], "bytes": after[n]["busReceivedBytes"]},
        }
    ok = got == expected and problem is None and run["failures"] == 0
    return {
        "shards": shards,
        "topic": topic,
        "busy0Shard": k0,
        "channelsInBusy0Shard": len(same_shard),
        "publishedInBusy0Shard": sum(run["ackedPerChannel"][c] for c in same_shard),
        "warmup": {k: warm[k] for k in ("acked", "failures", "seconds")},
        "publisher": {k: v for k, v in run.items() if k != "ackedPerChannel"},
        "publishedToBusy0": expected,
        "subscriberReceived": got,
        "subscriberProblem": problem,
        "ok": ok,
        "instances": figures,
        "commands": {n: inst[n]["argv"] for n in ("A", "B")},
    }


def table(results: list[dict]) -> str:
    rows = [("layout", "instance", "messages received", "bytes received", "subscriptions", "share of A's (msgs / bytes)")]
    for r in results:
        a = r["instances"]["A"]
        for n in ("A", "B"):
            f = r["instances"][n]
            share = (f"{100 * f['messages'] / a['messages']:.1f} % / {100 * f['bytes'] / a['bytes']:.1f} %"
                     if a["messages"] and a["bytes"] else "-")
            rows.append((f"--pubsub-shards {r['shards']}", n, f"{f['messages']:,}", f"{f['bytes']:,}",
                         str(f["subscriptions"]), share))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.rjust(widths[i]) if i in (2, 3, 4) else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the switchboard binary")
    ap.add_argument("--shards", default="1,32", help="layouts to run, comma-separated (default 1,32)")
    ap.add_argument("--rate", type=float, default=500, help="total publications per second (default 500)")
    ap.add_argument("--seconds", type=float, default=10, help="length of the timed run (default 10)")
    ap.add_argument("--payload", type=int, default=100, help="bytes of each publication's data, as JSON (default 100)")
    ap.add_argument("--workers", type=int, default=64, help="concurrent HTTP publishers (default 64)")
    ap.add_argument("--settle", type=float, default=2, help="seconds waited before each metrics read (default 2)")
    ap.add_argument("--out", help="results directory (default bench/results/<UTC date and time>-pubsub-traffic)")
    args = ap.parse_args()
    if args.rate <= 0 or not 0 < args.seconds <= 120 or args.rate * args.seconds > 200_000:
        ap.error("keep it bounded: rate > 0, 0 < seconds <= 120, rate x seconds <= 200,000")
    if not os.access(args.bin, os.X_OK):
        ap.error(f"no switchboard binary at {args.bin} (build it, or pass --build to pubsub_traffic.sh)")
    layouts = [int(s) for s in args.shards.split(",") if s.strip()]

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or os.path.join(root, "bench", "results", f"{now:%Y%m%dT%H%M%SZ}-pubsub-traffic")
    os.makedirs(out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="pubsub-traffic-")
    run_id = f"{int(time.time())}-{os.getpid()}"

    procs = Procs()

    def on_signal(signum, _frame):
        log(f"signal {signum}: stopping everything this script started")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    results = []
    try:
        emu = start_emulator(procs, workdir)
        log(f"emulator on 127.0.0.1:{emu}; results and logs: {out}")
        for shards in layouts:
            results.append(run_layout(args, procs, emu, shards, run_id, workdir))
    finally:
        procs.stop_all()
        logs = os.path.join(out, "logs")
        os.makedirs(logs, exist_ok=True)
        for name in sorted(os.listdir(workdir)):
            if name.endswith(".log"):
                shutil.copy(os.path.join(workdir, name), logs)
        shutil.rmtree(workdir, ignore_errors=True)

    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    doc = {
        "benchmark": "pubsub-traffic",
        "date": now.isoformat(timespec="seconds"),
        "commit": commit,
        "binary": os.path.abspath(args.bin),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "uname": " ".join(os.uname())},
        "parameters": {"channels": CHANNELS, "rate": args.rate, "seconds": args.seconds,
                       "payloadBytes": args.payload, "workers": args.workers},
        "window": "bus figures are the difference of /metrics read after the warm-up and after the timed run",
        "layouts": results,
    }
    path = os.path.join(out, "pubsub-traffic.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    print()
    print(table(results))
    print()
    for r in results:
        p = r["publisher"]
        print(f"--pubsub-shards {r['shards']}: published {p['acked']:,} in {p['seconds']} s "
              f"({p['ratePerSecond']:g}/s, {p['failures']} failed, ack p50 {p['ackLatencyMs']['p50']} ms, "
              f"p99 {p['ackLatencyMs']['p99']} ms); busy-0's shard {r['busy0Shard']} holds "
              f"{r['channelsInBusy0Shard']} of {CHANNELS} channels ({r['publishedInBusy0Shard']:,} publications); "
              f"B's subscriber got {r['subscriberReceived']:,} of {r['publishedToBusy0']:,} on busy-0"
              + ("" if r["ok"] else f"  ** FAILED: {r['subscriberProblem'] or 'count mismatch or publish failures'}"))
    print(f"\nresults: {path}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
