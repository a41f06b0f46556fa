// Test helper: a private redis-server on a free loopback port, which a test
// may stop (a bus outage) and start again on the same port. Nothing is saved
// to disk (`--save '' --appendonly no`).
//
//   const redis = await startRedis();
//   redis.url         // redis://127.0.0.1:N
//   await redis.stop();  // the bus is down
//   await redis.start(); // and back, same port, empty
//
// Needs `redis-server` on the PATH (or $REDIS_SERVER).

import { spawn } from 'node:child_process';
import net from 'node:net';

import { freePort } from './server.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function answersPing(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port }, () => sock.write('PING\r\n'));
    sock.setTimeout(500, () => {
      sock.destroy();
      resolve(false);
    });
    sock.on('data', (d) => {
      sock.destroy();
      resolve(d.toString().startsWith('+PONG'));
    });
    sock.on('error', () => resolve(false));
  });
}

export async function startRedis() {
  const port = await freePort();
  const bin = process.env.REDIS_SERVER || 'redis-server';
  let child = null;
  const handle = {
    port,
    url: `redis://127.0.0.1:${port}`,
    async start() {
      const log = [];
      child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      child.stdout.on('data', (c) => log.push(c.toString()));
      child.stderr.on('data', (c) => log.push(c.toString()));
      const spawned = new Promise((resolve, reject) => {
        child.once('spawn', resolve);
        child.once('error', reject);
      });
      try {
        await spawned;
      } catch (err) {
        throw new Error(`cannot run ${bin} (${err.message}): install it with \`apt-get install redis-server\` or set REDIS_SERVER`);
      }
      for (let i = 0; i < 100; i++) {
        if (await answersPing(port)) return handle;
        if (child.exitCode !== null) break;
        await sleep(50);
      }
      child.kill('SIGKILL');
      throw new Error(`redis-server on port ${port} did not start:\n${log.join('')}`);
    },
    async stop() {
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    },
  };
  return handle.start();
}
