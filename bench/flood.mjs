// A bounded hostile-client flood against a running Switchboard, for the
// history budget (issue 13): N anonymous connections publish messages of
// SIZE bytes at the per-connection rate limit, each into a new channel while
// the server lets them create channels and into the channels they created
// once it answers `channel_limit`. A probe client meanwhile publishes into
// its own channel once a second and times the round trip. Every 5 s the
// server's RSS (/proc/PID/status) is printed. Stops by itself after SECONDS.
//
//   node --experimental-websocket bench/flood.mjs --url ws://127.0.0.1:8080/ \
//        --pid $(pgrep -n switchboard) --conns 4 --seconds 60 --size 63000 --rate 100
//
// Loopback only: the script refuses any other host.
import { readFileSync } from 'node:fs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const url = args.url ?? 'ws://127.0.0.1:8080/';
const pid = Number(args.pid);
const conns = Number(args.conns ?? 4);
const seconds = Number(args.seconds ?? 60);
const size = Number(args.size ?? 63000);
const rate = Number(args.rate ?? 100);
const host = new URL(url).hostname;
if (!/^127\.|^localhost$|^\[::1\]$/.test(host)) throw new Error(`loopback targets only, not ${host}`);

const rssKiB = () => {
  if (!pid) return null;
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : null;
};
const open = () =>
  new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === 'connected') resolve(ws);
    };
    ws.onerror = () => reject(new Error('connect failed'));
  });

const counts = { sent: 0, acks: 0, errors: {}, closes: [] };
const payload = 'x'.repeat(size);
const start = Date.now();
const rss0 = rssKiB();
const deadline = start + seconds * 1000;
const timers = [];

for (let c = 0; c < conns; c++) {
  const ws = await open();
  const created = [];
  let next = 0;
  let limited = false;
  let cursor = 0;
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.type === 'ack') {
      counts.acks++;
      if (m.offset === 1) created.push(m.channel);
    } else if (m.type === 'error') {
      counts.errors[m.code] = (counts.errors[m.code] ?? 0) + 1;
      if (m.code === 'channel_limit') limited = true;
    }
  };
  ws.onclose = (e) => counts.closes.push(e.code);
  timers.push(
    setInterval(() => {
      if (ws.readyState !== WebSocket.OPEN || Date.now() > deadline) return;
      let channel;
      if (!limited || created.length === 0) channel = `flood:c${c}-${next++}`;
      else channel = created[cursor++ % created.length];
      if (limited && created.length > 0 && cursor % 50 === 0) limited = false; // try new ones again now and then
      ws.send(JSON.stringify({ type: 'publish', channel, data: payload, id: counts.sent }));
      counts.sent++;
    }, 1000 / rate),
  );
}

const probe = await open();
let probeSent = 0;
const rtts = [];
let probeAt = 0;
probe.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.type === 'message') rtts.push(Date.now() - probeAt);
};
probe.send(JSON.stringify({ type: 'subscribe', channel: 'probe:rt', id: 'p' }));
timers.push(
  setInterval(() => {
    probeAt = Date.now();
    probeSent++;
    probe.send(JSON.stringify({ type: 'publish', channel: 'probe:rt', data: probeSent }));
  }, 1000),
);
let peak = rss0;
timers.push(
  setInterval(() => {
    const r = rssKiB();
    if (r !== null) peak = Math.max(peak, r);
    console.log(`t=${((Date.now() - start) / 1000).toFixed(0)}s rss=${r === null ? '?' : (r / 1024).toFixed(1)}MiB sent=${counts.sent} acks=${counts.acks} errors=${JSON.stringify(counts.errors)}`);
  }, 5000),
);
await new Promise((r) => setTimeout(r, seconds * 1000 + 2000));
for (const t of timers) clearInterval(t);
rtts.sort((a, b) => a - b);
console.log(
  JSON.stringify({
    conns,
    seconds,
    size,
    rate,
    rssStartMiB: rss0 === null ? null : +(rss0 / 1024).toFixed(1),
    rssPeakMiB: peak === null ? null : +(peak / 1024).toFixed(1),
    rssEndMiB: pid ? +(rssKiB() / 1024).toFixed(1) : null,
    ...counts,
    probe: { sent: probeSent, served: rtts.length, p50ms: rtts[Math.floor(rtts.length / 2)] ?? null, maxms: rtts.at(-1) ?? null },
  }),
);
process.exit(0);
