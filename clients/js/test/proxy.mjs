// Test helper: a small HTTP proxy in front of one or more servers that
// refuses every WebSocket upgrade (as some corporate proxies do) and sends
// each plain request to the next upstream in turn (no session affinity).
//
//   const proxy = await startProxy([serverA.port, serverB.port]);
//   proxy.url        // ws://127.0.0.1:N/ws  (the upgrade is refused)
//   proxy.upgradesRefused, proxy.requests  // what it saw: [{method, path, upstream}]
//   await proxy.close();
import http from 'node:http';

export async function startProxy(upstreamPorts) {
  let next = 0;
  const requests = [];
  const sockets = new Set();
  const state = { upgradesRefused: 0 };
  const server = http.createServer((req, res) => {
    const port = upstreamPorts[next++ % upstreamPorts.length];
    requests.push({ method: req.method, path: req.url, upstream: port });
    const up = http.request(
      { host: '127.0.0.1', port, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        res.writeHead(upRes.statusCode, upRes.headers);
        res.flushHeaders();
        upRes.pipe(res);
        // An upstream that dies mid-stream: the client's connection dies too.
        upRes.on('close', () => {
          if (!upRes.complete) res.destroy();
        });
      },
    );
    up.on('error', () => {
      if (!res.headersSent) res.writeHead(502).end('upstream unreachable');
      else res.destroy();
    });
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('upgrade', (req, socket) => {
    state.upgradesRefused++;
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    httpUrl: `http://127.0.0.1:${port}`,
    requests,
    get upgradesRefused() {
      return state.upgradesRefused;
    },
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
