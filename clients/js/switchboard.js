// switchboard.js - browser and Node (>= 20) client for the Switchboard
// real-time WebSocket server. Zero dependencies, one ES module.
//
// The API is a superset of the App Engine Flex tutorial's `RealtimeClient`:
// `new RealtimeClient(url)`, `connect()`, `send(type, data)` and
// `on(type, handler)` behave as there (a handler gets the parsed frame), and a
// client written for the tutorial keeps working. On top of that: channels
// with recovery after reconnect, requests matched by `id`/`ref` with
// timeouts, presence, history, reconnect with full-jitter backoff that never
// gives up by default, dead-connection detection and a bounded queue for what
// is sent while disconnected. See README.md beside this file and
// docs/protocol.md for the wire protocol.

const DEFAULTS = Object.freeze({
  WebSocket: undefined,
  requestTimeout: 10_000,
  maxReconnectAttempts: Infinity,
  reconnectBaseDelay: 500,
  reconnectMaxDelay: 30_000,
  heartbeatTimeout: 45_000,
  heartbeatPongTimeout: 5_000,
  connectTimeout: 10_000,
  queueWhileDisconnected: 100,
  random: Math.random,
  transports: ['websocket', 'sse'],
  sseUrl: undefined,
  fetch: undefined,
});

const TRANSPORTS = ['websocket', 'sse'];

// The reply types that settle each kind of request (besides `error`).
const REPLY_TYPES = Object.freeze({
  broadcast: ['ack'],
  direct: ['ack'],
  publish: ['ack'],
  subscribe: ['subscribed'],
  unsubscribe: ['unsubscribed'],
  presence: ['presence'],
  history: ['history'],
  ping: ['pong'],
});

const WS_OPEN = 1;

/** An error settled by the server (`error` frame) or by the client itself. */
export class SwitchboardError extends Error {
  /**
   * @param {string} code  a protocol code (`unknown_target`, …) or a client
   *   code: `timeout`, `disconnected`, `closed`, `queue_full`.
   * @param {string} message
   * @param {object} [frame] the `error` frame, when the server sent one
   */
  constructor(code, message, frame) {
    super(message || code);
    this.name = 'SwitchboardError';
    this.code = code;
    if (frame !== undefined) {
      this.frame = frame;
      if (frame && 'ref' in frame) this.ref = frame.ref;
    }
  }
}

/** A tiny event emitter shared by the client and its subscriptions. */
class Emitter {
  constructor() {
    this.listeners = new Map();
  }

  on(type, handler) {
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(handler);
    return this;
  }

  off(type, handler) {
    const list = this.listeners.get(type);
    if (!list) return this;
    if (handler === undefined) {
      this.listeners.delete(type);
      return this;
    }
    const i = list.indexOf(handler);
    if (i !== -1) list.splice(i, 1);
    if (list.length === 0) this.listeners.delete(type);
    return this;
  }

  _emit(type, ...args) {
    const list = this.listeners.get(type);
    if (!list) return;
    // A copy, so a handler may add or remove handlers while we iterate.
    for (const handler of list.slice()) {
      try {
        handler(...args);
      } catch (err) {
        // One faulty handler must not break delivery to the others or the
        // client's own bookkeeping.
        console.error(`switchboard: a '${type}' handler threw:`, err);
      }
    }
  }
}

/**
 * One channel subscription. It lives until `unsubscribe()`: the client
 * re-subscribes it after every reconnect, with recovery.
 *
 * Events (`sub.on(event, fn)`):
 * - `message`  (frame): each publication, once, in offset order
 * - `subscribed` (frame): after every successful (re)subscribe
 * - `recovery-failed` (info): a resubscribe could not recover every missed
 *   publication (`recovered:false`), including the renewal the client makes
 *   itself when a live message comes from another epoch (the stream was
 *   replaced: expired, or lost by the bus); `info` is
 *   `{channel, epoch, offset, previous: {epoch, offset}, frame}`. The
 *   subscription goes on live from `offset`; fetch `history` if you need
 *   what is still retained.
 * - `join` / `leave` (frame): presence events of the channel
 * - `unsubscribed` (frame): the server ended the subscription (a refreshed
 *   token no longer grants the channel); it is not resubscribed
 * - `error` (SwitchboardError): a (re)subscribe was refused
 */
export class Subscription extends Emitter {
  /**
   * Made by `client.subscribe()`, never by the app.
   * @param {RealtimeClient} client
   * @param {string} channel
   * @param {{epoch: string, offset: number}} [since] a position to resume from
   */
  constructor(client, channel, since) {
    super();
    this.client = client;
    this.channel = channel;
    /** `pending` until the first `subscribed`, then `subscribed`; `unsubscribed` at the end. */
    this.state = 'pending';
    /** Epoch of the stream the position below belongs to (null before the first `subscribed`). */
    this.epoch = since ? since.epoch : null;
    /** Offset of the last publication delivered (or the stream top at subscribe time). */
    this.offset = since ? since.offset : null;
    /** Whether the subscription is currently confirmed on the live connection. */
    this.active = false;
    /**
     * Whether the channel's namespace uses acknowledged delivery (from the
     * server's `subscribed`): the client then acknowledges each publication
     * once the app's handlers have run.
     */
    this.acked = false;
    // The last `subscribed` frame: what a later subscribe() of the channel resolves with.
    this._lastSubscribed = null;
    // The pending cumulative ack (see _scheduleAck), or null.
    this._ackTimer = null;
    // The id of the last subscribe request sent for this subscription.
    this._requestId = null;
    // subscribe() calls waiting for the first `subscribed`: {resolve, reject, timeout}.
    this._firstWaiters = [];
    // Renewing the subscription after a live message of another epoch
    // (see RealtimeClient#_resync): live messages are dropped until the
    // server's `subscribed` answer.
    this._resyncing = false;
  }

  /** The position to resume from, or null. */
  get position() {
    return this.epoch === null ? null : { epoch: this.epoch, offset: this.offset };
  }

  unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }

  // ------------------------------------------------------------ used by the client
  // The subscription's state changes only here; RealtimeClient calls these.

  // A promise of the first `subscribed` frame (at once if already confirmed).
  _confirmation(timeout) {
    return new Promise((resolve, reject) => {
      if (this.state === 'subscribed' && this._lastSubscribed) resolve(this._lastSubscribed);
      else this._firstWaiters.push({ resolve, reject, timeout });
    });
  }

  // The subscribe request `id` was sent. Returns the `since` to send (a copy
  // of the position, or null when there is none to resume from) and the
  // timeout a waiting subscribe() asked for (undefined if none did).
  _subscribing(id) {
    this._requestId = id;
    const since =
      this.epoch !== null && typeof this.offset === 'number' ? { epoch: this.epoch, offset: this.offset } : null;
    const timeout = this._firstWaiters.find((w) => w.timeout !== undefined)?.timeout;
    return { since, timeout };
  }

  // Whether the subscription is being renewed after a live message of
  // another epoch (live messages are then dropped until `subscribed`).
  _renewing() {
    return this._resyncing;
  }

  // The client renews the subscription (see RealtimeClient#_resync).
  _beginRenewal() {
    this._resyncing = true;
  }

  // Whether `msg` (a live `message` of this channel) belongs to another
  // stream than the one the position is in.
  _epochChanged(msg) {
    return this.epoch !== null && typeof msg.offset === 'number' && typeof msg.epoch === 'string' && msg.epoch !== this.epoch;
  }

  // Whether `msg` (a `message` of this channel) reaches the app: false for a
  // publication already delivered. Otherwise the position moves to it, the
  // `message` handlers run, and an ack is scheduled in acked namespaces.
  _deliver(msg) {
    const epoch = msg.epoch ?? this.epoch;
    const offset = msg.offset;
    if (typeof offset === 'number' && this.epoch !== null && epoch === this.epoch && offset <= this.offset) {
      return false;
    }
    if (typeof offset === 'number') {
      this.epoch = epoch;
      this.offset = offset;
    }
    this._emit('message', msg);
    if (this.acked) this._scheduleAck();
    return true;
  }

  // Acknowledge, cumulatively and at most every 50 ms, what the app's
  // handlers have been handed. An ack lost with the connection does no
  // harm: the resubscribe resumes from the last delivered offset, and the
  // server resends what it did not see acknowledged.
  _scheduleAck() {
    if (this._ackTimer !== null) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      if (!this.active || typeof this.offset !== 'number') return;
      this.client._sendAck(this.channel, this.offset);
    }, 50);
  }

  // The server confirmed a (re)subscribe that asked to resume from `since`
  // (or null). Moves the position, resolves the waiting subscribe() calls
  // and emits `subscribed`; returns the `recovery-failed` event when the
  // server could not recover from `since` (emitted here too), else null.
  _confirmed(reply, since) {
    const previous = since ? { ...since } : null;
    if (reply.recovered === false || this.epoch !== reply.epoch || typeof this.offset !== 'number') {
      this.epoch = reply.epoch;
      this.offset = reply.offset;
    } else if (reply.offset > this.offset) {
      // Recovered: every missed publication was delivered before this frame,
      // so reply.offset === this.offset in practice; never move backwards.
      this.offset = reply.offset;
    }
    this.state = 'subscribed';
    this._resyncing = false;
    this.active = true;
    this.acked = reply.acked === true;
    this._lastSubscribed = reply;
    for (const w of this._firstWaiters.splice(0)) w.resolve(reply);
    this._emit('subscribed', reply);
    if (!previous || reply.recovered !== false) return null;
    const info = {
      type: 'recovery-failed',
      channel: this.channel,
      epoch: reply.epoch,
      offset: reply.offset,
      previous,
      frame: reply,
    };
    this._emit('recovery-failed', info);
    return info;
  }

  // The connection this subscription was confirmed on is gone (it stays,
  // and is resubscribed on the next connection).
  _disconnected() {
    this.active = false;
    this._resyncing = false; // the resubscribe on the next connection renews it
  }

  // The subscription is over: unsubscribed by the app, or refused by the
  // server (`err`: then the waiting subscribe() calls reject with it and
  // `error` is emitted). Returns what it was: `{wasActive, requestId}`.
  _ended(err) {
    const wasActive = this.active;
    this.state = 'unsubscribed';
    this.active = false;
    const waiters = this._firstWaiters.splice(0);
    const reason =
      err ?? new SwitchboardError('unsubscribed', `unsubscribed from ${this.channel} before it was confirmed`);
    for (const w of waiters) w.reject(reason);
    if (err) this._emit('error', err);
    return { wasActive, requestId: this._requestId };
  }

  // The client gave up (close(), or reconnecting gave up): the waiting
  // subscribe() calls reject with `err`; the subscription itself is kept.
  _abandonWaiters(err) {
    for (const w of this._firstWaiters.splice(0)) w.reject(err);
  }
}

// The SSE endpoint for a WebSocket URL: `ws(s)://host[/prefix]/ws?q` →
// `http(s)://host[/prefix]/sse?q` (a path ending in `/` gets `sse` added).
export function sseUrlFor(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : u.protocol === 'ws:' ? 'http:' : u.protocol;
  u.pathname = u.pathname.endsWith('/ws') ? `${u.pathname.slice(0, -3)}/sse` : u.pathname.replace(/\/?$/, '/sse');
  return u.toString();
}

// Frames one POST carries at most (the server's bound).
const SSE_MAX_FRAMES = 32;

/**
 * The Server-Sent Events transport behind the WebSocket interface the
 * client uses (`readyState`, `send`, `close`, `onopen`/`onmessage`/
 * `onclose`/`onerror`), so that nothing above it knows which one it has.
 * The stream is read with `fetch` (not `EventSource`, which reconnects by
 * itself and hides status codes); frames go out as `POST …/sse/send` with
 * the session id from the welcome, in order, one request in flight. The
 * server's last event, `{"type":"close",code,reason}`, is the close.
 */
class SseSocket {
  constructor(url, fetchImpl) {
    this.url = url;
    this.readyState = 0;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    /** Keep-alive comments (no message): a sign of life for the heartbeat. */
    this.onactivity = null;
    this._fetch = fetchImpl;
    this._abort = new AbortController();
    this._session = null;
    this._outbox = [];
    this._posting = false;
    const u = new URL(url);
    u.pathname = `${u.pathname.replace(/\/$/, '')}/send`;
    u.search = '';
    this._sendUrl = u.toString();
    this._run();
  }

  async _run() {
    let closed = null;
    try {
      const res = await this._fetch(this.url, {
        headers: { accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this._abort.signal,
      });
      if (!res.ok || !res.body) {
        closed = { code: 1006, reason: `SSE stream refused: ${res.status}` };
        this.onerror?.({ type: 'error' });
        return;
      }
      this.readyState = 1;
      this.onopen?.({ type: 'open' });
      closed = await this._read(res.body.getReader());
    } catch {
      closed = { code: 1006, reason: '' };
      if (this.readyState === 0) this.onerror?.({ type: 'error' });
    } finally {
      this._finish(closed ?? { code: 1006, reason: '' });
    }
  }

  // Read events until the close event (its code and reason) or the end.
  async _read(reader) {
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return { code: 1006, reason: '' };
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.search(/\r?\n\r?\n/)) !== -1) {
        const block = buf.slice(0, end);
        buf = buf.slice(end).replace(/^\r?\n\r?\n/, '');
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith('data:')) data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
        }
        if (data.length === 0) {
          this.onactivity?.(); // a keep-alive comment: the stream is alive
          continue;
        }
        const text = data.join('\n');
        let frame = null;
        try {
          frame = JSON.parse(text);
        } catch {
          // not ours to judge: handed on as is
        }
        if (frame && frame.type === 'close') return { code: frame.code ?? 1000, reason: frame.reason ?? '' };
        if (frame && frame.type === 'connected' && typeof frame.session === 'string') {
          this._session = frame.session;
          this._pump();
        }
        if (this.readyState === 1) this.onmessage?.({ data: text });
      }
    }
  }

  _finish({ code, reason }) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._abort.abort();
    this.onclose?.({ code, reason });
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('SSE stream not open');
    this._outbox.push(text);
    this._pump();
  }

  // Post what is waiting, in order, one request at a time.
  async _pump() {
    if (this._posting || this._session === null) return;
    this._posting = true;
    try {
      while (this._outbox.length > 0 && this.readyState === 1) {
        const batch = this._outbox.slice(0, SSE_MAX_FRAMES);
        const body = `{"session":${JSON.stringify(this._session)},"frames":[${batch.join(',')}]}`;
        const res = await this._fetch(this._sendUrl, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body,
          signal: this._abort.signal,
        });
        await res.arrayBuffer().catch(() => {});
        if (res.status === 429) {
          const wait = Number(res.headers.get('retry-after')) || 1;
          await new Promise((r) => setTimeout(r, wait * 1000));
          continue; // the same batch again: nothing of it was queued
        }
        this._outbox.splice(0, batch.length);
        if (res.status === 404) {
          this._finish({ code: 4404, reason: 'SSE session unknown to the server' });
          return;
        }
        // Any other refusal (400, 413) concerns these frames only.
      }
    } catch {
      this._finish({ code: 1006, reason: 'SSE send failed' });
    } finally {
      this._posting = false;
    }
  }

  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._abort.abort();
  }
}

function jsonId(value) {
  // Request ids are numbers we generate; a ref comes back as the same JSON value.
  return typeof value === 'number' || typeof value === 'string' ? String(value) : JSON.stringify(value);
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new TypeError('RealtimeClient: a url is required outside a browser');
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}

/** Parse `retry=<ms>` out of a close reason, or return null. */
export function parseRetryHint(reason) {
  if (typeof reason !== 'string') return null;
  const m = /(?:^|[^a-z0-9_])retry=(\d+)/i.exec(reason);
  if (!m) return null;
  const ms = Number(m[1]);
  return Number.isFinite(ms) && ms >= 0 ? ms : null;
}

export class RealtimeClient extends Emitter {
  /**
   * @param {string} [url] `ws(s)://host/ws`; in a browser it defaults to the
   *   page's host.
   * @param {object} [options] see README.md
   */
  constructor(url, options = {}) {
    super();
    this.url = url || defaultUrl();
    this.options = { ...DEFAULTS, ...options };
    /** The current WebSocket, or null (as in the tutorial). */
    this.ws = null;
    /** Consecutive failed attempts since the last successful connection. */
    this.reconnectAttempts = 0;
    this.maxReconnectAttempts = this.options.maxReconnectAttempts;
    /** `connecting` | `open` | `reconnecting` | `closed`. */
    this.state = 'closed';
    /** The id the server gave this connection (`connected` frame); changes on reconnect. */
    this.clientId = null;
    /** The server instance of the current connection. */
    this.instanceId = null;
    /** Channel name → Subscription. */
    this.subscriptions = new Map();
    /** The transport of the current connection: `websocket`, `sse`, or null. */
    this.transport = null;
    const bad = (this.options.transports || []).filter((t) => !TRANSPORTS.includes(t));
    if (!Array.isArray(this.options.transports) || this.options.transports.length === 0 || bad.length > 0) {
      throw new TypeError(`RealtimeClient: transports must list some of ${TRANSPORTS.join(', ')}`);
    }
    // Which of options.transports the next attempt uses; back to the first
    // after a connection that opened, or after trying them all.
    this._transportIndex = 0;

    this._nextId = 1;
    this._pending = new Map(); // jsonId(id) → {type, resolve, reject, timer, onReply}
    this._queue = []; // frames waiting for a connection: {frame, request?}
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._pongTimer = null;
    this._readyTimer = null;
    this._connectTimer = null;
    this._lastRx = 0;
    this._connectedFrame = null;
    this._closedByUser = false;
    this._stopped = false; // close() was called or reconnecting gave up
    this._retryHint = null;
    this._connectWaiters = [];
  }

  // ---------------------------------------------------------------- state

  _setState(state, info) {
    // Every scheduled reconnect is reported (with its attempt and delay);
    // other states only when they change.
    if (this.state === state && state !== 'reconnecting') return;
    this.state = state;
    this._emit('state', state, info || {});
  }

  /**
   * Open the connection (and keep it open: reconnects until `close()`).
   * Resolves with the `connected` frame of the first successful connection;
   * rejects only if `close()` is called or reconnecting gives up first.
   * Calling it while already connected or connecting is harmless.
   */
  connect() {
    const p = new Promise((resolve, reject) => {
      if (this.state === 'open' && this.clientId !== null && this._connectedFrame) {
        resolve(this._connectedFrame);
        return;
      }
      this._connectWaiters.push({ resolve, reject });
    });
    // A tutorial-style caller ignores the promise; never leave it unhandled.
    p.catch(() => {});
    if (this.state === 'closed') {
      this._closedByUser = false;
      this._stopped = false;
      this.reconnectAttempts = 0;
      this._open('connecting');
    }
    return p;
  }

  _open(state) {
    this._clearReconnectTimer();
    const transport = this.options.transports[this._transportIndex];
    const WS =
      transport === 'sse'
        ? this._sseSocketClass()
        : this.options.WebSocket || globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new Error(
        'RealtimeClient: no WebSocket implementation; pass options.WebSocket ' +
          '(Node 20 needs --experimental-websocket, Node >= 22 has it built in)',
      );
    }
    if (state !== 'reconnecting') this._setState(state, { attempt: this.reconnectAttempts });
    let ws;
    try {
      ws = new WS(transport === 'sse' ? this.options.sseUrl || sseUrlFor(this.url) : this.url);
    } catch (err) {
      // A malformed URL is a programming error: give up at once.
      this._giveUp(new SwitchboardError('closed', `cannot open ${this.url}: ${err.message}`));
      throw err;
    }
    this.ws = ws;
    this.transport = transport;
    this._opened = false;
    this._connectedFrame = null;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    if (transport === 'sse') ws.onactivity = () => ws === this.ws && this._touch();
    ws.onerror = (event) => {
      if (ws !== this.ws) return;
      // Browsers give no detail. A close event should follow, but some
      // implementations (Node 20's) never fire it for a failed handshake:
      // do not wait for it.
      this._emit('socket-error', event);
      setTimeout(() => {
        if (ws === this.ws && ws.readyState !== WS_OPEN) this._onClose(ws, 1006, '');
      }, 50);
    };
    // A handshake that hangs (a black-holed address) counts as a failure.
    const { connectTimeout } = this.options;
    if (connectTimeout > 0 && Number.isFinite(connectTimeout)) {
      this._connectTimer = setTimeout(() => {
        this._connectTimer = null;
        if (ws === this.ws && ws.readyState !== WS_OPEN) this._dropConnection('connect timeout');
      }, connectTimeout);
    }
  }

  // An SseSocket class bound to the fetch to use.
  _sseSocketClass() {
    const fetchImpl = this.options.fetch || globalThis.fetch?.bind(globalThis);
    if (typeof fetchImpl !== 'function') return undefined;
    return class extends SseSocket {
      constructor(url) {
        super(url, fetchImpl);
      }
    };
  }

  _onOpen(ws) {
    if (ws !== this.ws) return;
    this._opened = true;
    this._clearConnectTimer();
    this._retryHint = null;
    this._touch();
    // The server's first frame is `connected`; the connection counts as open
    // (state `open`, clientId known) once it has arrived. A server that does
    // not send it is given a second.
    this._readyTimer = setTimeout(() => {
      this._readyTimer = null;
      this._ready(ws);
    }, 1000);
  }

  // The connection is usable: resubscribe (with recovery), flush the queue.
  _ready(ws) {
    if (ws !== this.ws || this.state === 'open') return;
    if (this._readyTimer !== null) {
      clearTimeout(this._readyTimer);
      this._readyTimer = null;
    }
    this.reconnectAttempts = 0;
    this._setState('open', { clientId: this.clientId, instanceId: this.instanceId });
    for (const sub of this.subscriptions.values()) this._sendSubscribe(sub);
    const queued = this._queue;
    this._queue = [];
    for (const item of queued) {
      if (ws !== this.ws) {
        // The socket died while flushing: keep the rest for the next connection.
        this._queue.push(item);
      } else {
        this._transmit(item);
      }
    }
    for (const w of this._connectWaiters.splice(0)) w.resolve(this._connectedFrame);
  }

  _onMessage(ws, event) {
    if (ws !== this.ws) return;
    this._touch();
    if (typeof event.data !== 'string') return; // binary frames are not part of the protocol
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') return;

    switch (msg.type) {
      case 'connected':
        this.clientId = msg.clientId ?? null;
        this.instanceId = msg.instanceId ?? null;
        this._connectedFrame = msg;
        this._ready(ws);
        break;
      case 'message':
        if (!this._acceptMessage(msg)) return; // a duplicate: the app never sees it twice
        break;
      case 'join':
      case 'leave': {
        const sub = this.subscriptions.get(msg.channel);
        if (sub) sub._emit(msg.type, msg);
        break;
      }
      case 'unsubscribed': {
        // Without `ref` the server ended the subscription itself (a refreshed
        // token no longer grants the channel): it is not resubscribed.
        if (msg.ref !== undefined && msg.ref !== null) break;
        const sub = this.subscriptions.get(msg.channel);
        if (!sub) break;
        this.subscriptions.delete(msg.channel);
        sub._ended();
        sub._emit('unsubscribed', msg);
        break;
      }
      default:
        break;
    }

    if ('ref' in msg && msg.ref !== null && msg.ref !== undefined) this._settle(msg);
    this._emit(msg.type, msg);
  }

  // Decide whether a `message` reaches the app; deliver it to its subscription.
  _acceptMessage(msg) {
    const sub = this.subscriptions.get(msg.channel);
    if (!sub) return true; // not ours to track (e.g. subscribed via raw send())
    if (sub._renewing()) return false; // the renewed subscription covers it
    if (sub._epochChanged(msg)) {
      this._resync(sub);
      return false;
    }
    return sub._deliver(msg);
  }

  // A live message in another epoch than the subscription's: the stream was
  // replaced (it expired, or the bus lost it), and what the old one held
  // after our position may be gone. Treated as a gap, never adopted
  // silently: the subscription is renewed on this connection from its
  // position, and the server's answer tells the app (`recovery-failed`
  // when it cannot recover, which is the case for a replaced stream).
  _resync(sub) {
    sub._beginRenewal();
    const id = this._nextId++;
    const ignore = () => {};
    this._transmit({
      frame: { type: 'unsubscribe', channel: sub.channel, id },
      request: { id, type: 'unsubscribe', timer: null, timeout: this.options.requestTimeout, resolve: ignore, reject: ignore },
    });
    this._sendSubscribe(sub);
  }

  // A subscription's cumulative ack (see Subscription#_scheduleAck): sent
  // when connected, else dropped (the resubscribe covers it).
  _sendAck(channel, offset) {
    if (!this.connected) return;
    try {
      this._write({ type: 'ack', channel, offset });
    } catch {
      // The connection is going away; the resubscribe covers it.
    }
  }

  _onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this._clearConnectTimer();
    this._detach(ws);
    this.ws = null;
    this.clientId = null;
    this._stopHeartbeat();
    for (const sub of this.subscriptions.values()) sub._disconnected();
    this._rejectPending('disconnected', `connection closed (${code}${reason ? ` ${reason}` : ''})`);
    if (this._closedByUser) {
      this._setState('closed', { code, reason });
      return;
    }
    const hint = parseRetryHint(reason);
    if (hint !== null) this._retryHint = hint;
    // A transport that could not open: the next one in `transports` at
    // once. Otherwise the next attempt starts over with the first (so a
    // client on SSE goes back to WebSocket when it can).
    const { transports } = this.options;
    if (!this._opened && this._transportIndex + 1 < transports.length) {
      this._transportIndex++;
      this._setState('reconnecting', { attempt: this.reconnectAttempts, delay: 0, code, reason, transport: transports[this._transportIndex] });
      this._reconnectTimer = setTimeout(() => {
        this._reconnectTimer = null;
        if (this._closedByUser) return;
        this._open('reconnecting');
      }, 0);
      return;
    }
    this._transportIndex = 0;
    this._scheduleReconnect(code, reason);
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _scheduleReconnect(code, reason) {
    if (this.reconnectAttempts >= this.maxReconnectAttempts) {
      this._giveUp(new SwitchboardError('closed', `gave up after ${this.reconnectAttempts} reconnect attempts`));
      this._setState('closed', { code, reason, gaveUp: true });
      return;
    }
    const delay = this._backoffDelay(this.reconnectAttempts);
    this.reconnectAttempts++;
    this._setState('reconnecting', { attempt: this.reconnectAttempts, delay, code, reason });
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this._closedByUser) return;
      this._open('reconnecting');
    }, delay);
  }

  /** Full jitter: uniform in [0, min(cap, base·2^attempt)], plus any server `retry=` hint. */
  _backoffDelay(attempt) {
    const { reconnectBaseDelay: base, reconnectMaxDelay: cap, random } = this.options;
    const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
    const jitter = Math.floor(random() * ceiling);
    const hint = this._retryHint;
    this._retryHint = null;
    return hint !== null ? hint + jitter : jitter;
  }

  _clearConnectTimer() {
    if (this._connectTimer !== null) {
      clearTimeout(this._connectTimer);
      this._connectTimer = null;
    }
  }

  _clearReconnectTimer() {
    if (this._reconnectTimer !== null) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
    }
  }

  _giveUp(err) {
    this._stopped = true;
    this._clearReconnectTimer();
    for (const w of this._connectWaiters.splice(0)) w.reject(err);
    const queued = this._queue;
    this._queue = [];
    for (const item of queued) if (item.request) item.request.reject(err);
    this._rejectPending(err.code, err.message);
    for (const sub of this.subscriptions.values()) sub._abandonWaiters(err);
  }

  /**
   * Close the connection for good (no reconnect). Pending and queued
   * requests are rejected with code `closed`. Subscriptions are kept, so a
   * later `connect()` resumes them with recovery.
   */
  close(code = 1000, reason = '') {
    this._closedByUser = true;
    this._clearReconnectTimer();
    this._clearConnectTimer();
    this._stopHeartbeat();
    const ws = this.ws;
    this._giveUp(new SwitchboardError('closed', 'client closed'));
    if (ws) {
      this._detach(ws);
      this.ws = null;
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this.clientId = null;
    for (const sub of this.subscriptions.values()) sub._disconnected();
    this._setState('closed', { code, reason });
  }

  /**
   * Drop the current socket as if the network had failed, and reconnect
   * (with backoff). Used by the dead-connection detector; handy in tests.
   */
  _dropConnection(reason = 'dropped by client') {
    const ws = this.ws;
    if (!ws) return;
    this._detach(ws);
    try {
      ws.close(4000, reason.slice(0, 100));
    } catch {
      // ignore
    }
    // Browsers may take long to report the close of a dead TCP connection:
    // do not wait for it.
    this._onClose(ws, 4000, reason);
  }

  // ---------------------------------------------------------------- heartbeat

  // Something arrived (or the socket opened): the connection is alive.
  _touch() {
    this._lastRx = Date.now();
    if (this._pongTimer !== null) {
      clearTimeout(this._pongTimer);
      this._pongTimer = null;
    }
    if (this._heartbeatTimer === null) this._armHeartbeat(this.options.heartbeatTimeout);
  }

  // One timer, re-armed lazily: cheap however many frames arrive.
  _armHeartbeat(delay) {
    const { heartbeatTimeout, heartbeatPongTimeout } = this.options;
    if (!(heartbeatTimeout > 0) || !Number.isFinite(heartbeatTimeout)) return;
    this._heartbeatTimer = setTimeout(() => {
      this._heartbeatTimer = null;
      const ws = this.ws;
      if (!ws) return;
      const silent = Date.now() - this._lastRx;
      if (silent < heartbeatTimeout) {
        this._armHeartbeat(heartbeatTimeout - silent);
        return;
      }
      // Nothing at all for heartbeatTimeout: probe, then give it a few seconds.
      try {
        ws.send('{"type":"ping"}');
      } catch {
        // the close path will run
      }
      this._pongTimer = setTimeout(() => {
        this._pongTimer = null;
        this._dropConnection('heartbeat timeout');
      }, heartbeatPongTimeout);
    }, delay);
  }

  _stopHeartbeat() {
    if (this._heartbeatTimer !== null) clearTimeout(this._heartbeatTimer);
    if (this._pongTimer !== null) clearTimeout(this._pongTimer);
    if (this._readyTimer !== null) clearTimeout(this._readyTimer);
    this._heartbeatTimer = this._pongTimer = this._readyTimer = null;
  }

  // ---------------------------------------------------------------- sending

  get connected() {
    return this.state === 'open' && this.ws !== null && this.ws.readyState === WS_OPEN;
  }

  /**
   * The tutorial's `send`: sends `{type, data}` (plus any `extra` fields).
   * Unlike the tutorial it does not drop what is sent while disconnected: it
   * is queued (up to `queueWhileDisconnected`) and sent on reconnect.
   * Returns true if sent or queued, false if dropped because the queue is full
   * or the client is closed.
   */
  send(type, data, extra) {
    const frame = { ...(extra || {}), type };
    if (data !== undefined) frame.data = data;
    if (this.connected) {
      this._write(frame);
      return true;
    }
    if (this._stopped) return false;
    if (this._queue.length >= this.options.queueWhileDisconnected) return false;
    this._queue.push({ frame });
    return true;
  }

  _write(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  // Send `frame` as a request: give it an id, wait for its reply.
  _request(frame, opts = {}) {
    const id = this._nextId++;
    frame = { ...frame, id };
    return new Promise((resolve, reject) => {
      const request = {
        id,
        type: frame.type,
        resolve,
        reject,
        timer: null,
        timeout: opts.timeout ?? this.options.requestTimeout,
      };
      if (this.connected) {
        this._transmit({ frame, request });
        return;
      }
      if (this._stopped) {
        reject(new SwitchboardError('closed', 'client is closed'));
        return;
      }
      if (this._queue.length >= this.options.queueWhileDisconnected) {
        reject(new SwitchboardError('queue_full', `not connected and ${this._queue.length} messages already queued`));
        return;
      }
      this._queue.push({ frame, request });
    });
  }

  // Write a frame now; if it is a request, start its timeout clock.
  _transmit(item) {
    const { frame, request } = item;
    if (request) {
      const key = jsonId(request.id);
      this._pending.set(key, request);
      if (Number.isFinite(request.timeout) && request.timeout > 0) {
        request.timer = setTimeout(() => {
          if (this._pending.get(key) !== request) return;
          this._pending.delete(key);
          request.reject(new SwitchboardError('timeout', `no reply to ${request.type} within ${request.timeout} ms`));
          if (request.onTimeout) request.onTimeout();
        }, request.timeout);
      }
    }
    try {
      this._write(frame);
    } catch (err) {
      // The socket is closing: the close path rejects the request.
    }
  }

  _settle(msg) {
    const key = jsonId(msg.ref);
    const request = this._pending.get(key);
    if (!request) return;
    const accepts = REPLY_TYPES[request.type];
    if (msg.type !== 'error' && accepts && !accepts.includes(msg.type)) return;
    this._pending.delete(key);
    if (request.timer !== null) clearTimeout(request.timer);
    if (msg.type === 'error') {
      request.reject(new SwitchboardError(msg.code || 'error', msg.message || msg.code || 'error', msg));
    } else {
      request.resolve(msg);
    }
  }

  _rejectPending(code, message) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const request of pending) {
      if (request.timer !== null) clearTimeout(request.timer);
      request.reject(new SwitchboardError(code, message));
    }
  }

  // ---------------------------------------------------------------- API

  /** Application-level ping; resolves with the `pong` frame. */
  ping(opts) {
    return this._request({ type: 'ping' }, opts);
  }

  /** Broadcast to every other client; resolves with the `ack`. */
  broadcast(data, opts) {
    return this._request({ type: 'broadcast', data: data ?? null }, opts);
  }

  /** Send to one client; resolves with the `ack`, rejects with `unknown_target`. */
  direct(targetId, data, opts) {
    return this._request({ type: 'direct', targetId, data: data ?? null }, opts);
  }

  /**
   * Publish to a channel; resolves with the `ack` (`{channel, offset}`).
   * `opts`: `{idempotencyKey, expectedOffset, timeout}`. A repeated
   * `idempotencyKey` resolves with the first publication's ack; a wrong
   * `expectedOffset` rejects with `offset_mismatch` (`err.frame.offset` /
   * `err.frame.epoch`: the channel's current top).
   */
  publish(channel, data, opts = {}) {
    const frame = { type: 'publish', channel, data: data ?? null };
    if (opts.idempotencyKey !== undefined) frame.idempotencyKey = opts.idempotencyKey;
    if (opts.expectedOffset !== undefined) frame.expectedOffset = opts.expectedOffset;
    return this._request(frame, opts);
  }

  /** Who is in a channel; resolves with the `presence` frame. */
  presence(channel, opts) {
    return this._request({ type: 'presence', channel }, opts);
  }

  /**
   * A channel's retained publications, oldest first (`reverse: true`: the
   * newest `limit`, newest first); resolves with the `history` frame.
   * `opts`: `{since: {epoch, offset}, limit, reverse, timeout}`.
   */
  history(channel, opts = {}) {
    const frame = { type: 'history', channel };
    if (opts.since) frame.since = opts.since;
    if (opts.limit !== undefined) frame.limit = opts.limit;
    if (opts.reverse) frame.reverse = true;
    return this._request(frame, opts);
  }

  /** The subscription of `channel`, if any. */
  subscription(channel) {
    return this.subscriptions.get(channel);
  }

  /**
   * Subscribe to a channel. `handler` (optional) gets each publication once.
   * Resolves with the first `subscribed` frame; rejects with the server's
   * error (the subscription is then dropped). While disconnected the
   * subscribe is sent on the next connection. `opts.since` resumes from a
   * known position (e.g. one the app persisted).
   */
  subscribe(channel, handler, opts = {}) {
    let sub = this.subscriptions.get(channel);
    const isNew = !sub;
    if (!sub) {
      sub = new Subscription(this, channel, opts.since);
      this.subscriptions.set(channel, sub);
    }
    if (handler) sub.on('message', handler);
    const p = sub._confirmation(opts.timeout);
    if (isNew && this.connected) this._sendSubscribe(sub);
    return p;
  }

  _sendSubscribe(sub) {
    const id = this._nextId++;
    const { since, timeout } = sub._subscribing(id);
    const frame = { type: 'subscribe', channel: sub.channel };
    if (since) frame.since = { ...since };
    frame.id = id;
    const request = {
      id,
      type: 'subscribe',
      timer: null,
      timeout: timeout ?? this.options.requestTimeout,
      resolve: (reply) => this._onSubscribed(sub, reply, since),
      reject: (err) => this._onSubscribeFailed(sub, err),
    };
    this._transmit({ frame, request });
  }

  _onSubscribed(sub, reply, since) {
    if (this.subscriptions.get(sub.channel) !== sub) return; // unsubscribed meanwhile
    const failed = sub._confirmed(reply, since);
    if (failed) this._emit('recovery-failed', failed);
  }

  _onSubscribeFailed(sub, err) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    if (err.code === 'disconnected') return; // resent on the next connection
    if (err.code === 'closed') return; // close(): the subscription is kept for a later connect()
    if (err.code === 'timeout' && sub.state === 'subscribed') {
      // A resubscribe the server does not answer: the connection is not
      // healthy. Start over (the subscription is kept and retried).
      this._dropConnection('resubscribe timed out');
      return;
    }
    // Refused (bad channel, too many subscriptions, …) or timed out: drop it.
    this.subscriptions.delete(sub.channel);
    if (err.code === 'timeout' && this.connected) {
      // The server may still subscribe us: undo it, fire and forget.
      try {
        this._write({ type: 'unsubscribe', channel: sub.channel });
      } catch {
        // ignore
      }
    }
    sub._ended(err);
    this._emit('subscription-error', { channel: sub.channel, error: err });
  }

  /**
   * Stop receiving a channel. Resolves with the `unsubscribed` frame, or
   * with null when there was no live subscription to undo (not connected, or
   * not subscribed).
   */
  unsubscribe(channel, opts) {
    const sub = this.subscriptions.get(channel);
    if (sub) {
      this.subscriptions.delete(channel);
      const { wasActive, requestId } = sub._ended();
      const pendingSubscribe = requestId !== null && this._pending.has(jsonId(requestId));
      if (!this.connected || (!wasActive && !pendingSubscribe)) return Promise.resolve(null);
    } else if (!this.connected) {
      return Promise.resolve(null);
    }
    return this._request({ type: 'unsubscribe', channel }, opts).catch((err) => {
      if (err.code === 'not_subscribed' || err.code === 'disconnected') return null;
      throw err;
    });
  }
}

export default RealtimeClient;
