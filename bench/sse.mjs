#!/usr/bin/env node
// SSE figures for BENCHMARKS.md (issue 18): the server's resident memory per
// idle SSE connection (and per idle WebSocket, same run, same method), and a
// fan-out over SSE: S subscribed streams, K publications posted through
// POST /sse/send, deliveries/s, loss and publish→event latency.
//
//   node bench/sse.mjs --port PORT --pid PID [-n 5000] [--subscribers 1000] [--messages 200]
//                      [--idle sse,ws] [--no-fanout]
//
// Loopback only; every phase is bounded in connections and time. The server
// should run as bench/run.sh starts it: --rate-limit 0 --handshake-rate 0
// --max-connections-per-ip 0 --handshake-rate-per-ip 0.
import net from 'node:net';
import { readFileSync } from 'node:fs';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i === -1 ? dflt : process.argv[i + 1];
};
const PORT = Number(arg('--port'));
const PID = Number(arg('--pid'));
const N = Number(arg('-n', 5000));
const SUBS = Number(arg('--subscribers', 1000));
const MESSAGES = Number(arg('--messages', 200));
const KINDS = arg('--idle', 'sse,ws').split(',').filter(Boolean); // which idle runs, in order
const FANOUT = !process.argv.includes('--no-fanout');
const CONCURRENCY = 128;
if (!PORT || !PID) throw new Error('usage: --port PORT --pid PID [-n N] [--subscribers S] [--messages K]');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${PID}/status`, 'utf8'))[1]) * 1024;
const cpuTicks = () => {
  const f = readFileSync(`/proc/${PID}/stat`, 'utf8').split(') ')[1].split(' ');
  return Number(f[11]) + Number(f[12]); // utime + stime, in clock ticks (100/s)
};

const REQUESTS = {
  sse: `GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n`,
  ws:
    'GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
};

// Open one connection of `kind`; resolves once its welcome arrived, with
// the socket and (SSE) its session. `onEvent(data)` gets every later event.
function open(kind, onEvent) {
  return new Promise((resolve, reject) => {
    const s = net.connect(PORT, '127.0.0.1');
    let buf = '';
    let welcomed = false;
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('no welcome within 20 s'));
    }, 20_000);
    s.setEncoding('utf8');
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    s.on('close', () => {
      clearTimeout(timer);
      if (!welcomed) reject(new Error('closed before the welcome'));
    });
    s.on('connect', () => s.write(REQUESTS[kind]));
    s.on('data', (chunk) => {
      if (!welcomed) {
        buf += chunk;
        const m = /"session":"([^"]+)"/.exec(buf);
        if (buf.includes('"type":"connected"')) {
          welcomed = true;
          clearTimeout(timer);
          buf = '';
          resolve({ socket: s, session: m ? m[1] : null });
        }
        return;
      }
      if (!onEvent) return;
      buf += chunk;
      let end;
      while ((end = buf.indexOf('\n\n')) !== -1) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        for (const line of block.split('\n')) if (line.startsWith('data: ')) onEvent(line.slice(6));
      }
    });
  });
}

async function openMany(kind, n, onEvent) {
  const conns = [];
  let failed = 0;
  let next = 0;
  const worker = async () => {
    while (next < n) {
      next++;
      try {
        conns.push(await open(kind, onEvent));
      } catch {
        failed++;
      }
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  return { conns, failed, seconds: (performance.now() - t0) / 1000 };
}

const closeAll = (conns) => conns.forEach((c) => c.socket.destroy());

async function post(session, frames) {
  const res = await fetch(`http://127.0.0.1:${PORT}/sse/send`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ session, frames }),
  });
  await res.arrayBuffer();
  return res.status;
}

async function idle(kind) {
  closeAll((await openMany(kind, 32)).conns); // warm-up
  await sleep(1000);
  const before = rss();
  const { conns, failed, seconds } = await openMany(kind, N);
  await sleep(2000);
  const after = rss();
  const perConn = (after - before) / conns.length;
  closeAll(conns);
  await sleep(1500);
  return { kind, connected: conns.length, failed, kib_per_conn: +(perConn / 1024).toFixed(2), handshakes_per_s: Math.round(conns.length / seconds) };
}

async function fanout() {
  const channel = `bench:sse-${Date.now().toString(36)}`;
  const latencies = [];
  let delivered = 0;
  const onEvent = (data) => {
    if (!data.startsWith('{"type":"message"')) return;
    delivered++;
    const t = /"t":(\d+(?:\.\d+)?)/.exec(data);
    if (t) latencies.push(performance.timeOrigin + performance.now() - Number(t[1]));
  };
  const { conns } = await openMany('sse', SUBS, onEvent);
  for (let i = 0; i < conns.length; i += 64) {
    await Promise.all(conns.slice(i, i + 64).map((c) => post(c.session, [{ type: 'subscribe', channel }])));
  }
  await sleep(1000);
  const [publisher] = (await openMany('sse', 1)).conns;
  const cpu0 = cpuTicks();
  const t0 = performance.now();
  for (let k = 0; k < MESSAGES; k++) {
    const status = await post(publisher.session, [
      { type: 'publish', channel, data: { k, t: performance.timeOrigin + performance.now() } },
    ]);
    if (status !== 202) throw new Error(`publish POST answered ${status}`);
  }
  const expected = MESSAGES * conns.length;
  const deadline = Date.now() + 30_000;
  while (delivered < expected && Date.now() < deadline) await sleep(20);
  const seconds = (performance.now() - t0) / 1000;
  const cpu = (cpuTicks() - cpu0) / 100;
  closeAll([...conns, publisher]);
  latencies.sort((a, b) => a - b);
  const pct = (p) => +latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))].toFixed(1);
  return {
    subscribers: conns.length,
    messages: MESSAGES,
    delivered,
    lost: expected - delivered,
    deliveries_per_s: Math.round(delivered / seconds),
    latency_ms: { p50: pct(50), p99: pct(99), max: +latencies[latencies.length - 1].toFixed(1) },
    server_cpu_us_per_delivery: +((cpu * 1e6) / Math.max(1, delivered)).toFixed(2),
  };
}

const result = { n: N, idle: [] };
for (const kind of KINDS) result.idle.push(await idle(kind));
if (FANOUT) result.fanout = await fanout();
console.log(JSON.stringify(result, null, 2));
process.exit(0);
