// Every public API of switchboard.d.ts, used as a TypeScript app uses it.
// Only type-checked, never run: `npm run typecheck` in clients/js
// (`tsc -p tsconfig.json`, strict; it lies outside test/ so that
// no test runner picks it up). It imports the package by its name, so
// package.json's `exports`/`types` are checked too. `@ts-expect-error`
// lines are misuses the declarations must reject; `expectType` pins the
// exact type an API gives. What the d.ts says is checked against the JS at
// run time by types.test.mjs.

import RealtimeClientDefault, {
  RealtimeClient,
  Subscription,
  SwitchboardError,
  parseRetryHint,
  sseUrlFor,
  type AckFrame,
  type AnyFrame,
  type AuthenticatedFrame,
  type BroadcastFrame,
  type ClientErrorCode,
  type ClientEventMap,
  type ConnectedFrame,
  type ConnectionState,
  type Transport,
  type DirectFrame,
  type ErrorFrame,
  type FrameMap,
  type HistoryFrame,
  type HistoryOptions,
  type JoinLeaveFrame,
  type Json,
  type MessageFrame,
  type PongFrame,
  type PresenceFrame,
  type PresenceMember,
  type Publication,
  type PublishOptions,
  type RealtimeClientOptions,
  type RecoveryFailedEvent,
  type RequestId,
  type RequestOptions,
  type ServerErrorCode,
  type StateInfo,
  type StreamPosition,
  type SubscribeOptions,
  type SubscribedFrame,
  type SubscriptionErrorEvent,
  type SubscriptionEventMap,
  type UnsubscribedFrame,
  type WebSocketConstructor,
  type WebSocketLike,
} from '@switchboard/client';

/** Compiles only if `T` is exactly `U`. */
type Exactly<T, U> = (<V>() => V extends T ? 1 : 2) extends <V>() => V extends U ? 1 : 2 ? true : false;
function expectType<T>(_value: T): <U>(..._exact: Exactly<T, U> extends true ? [] : [never]) => void {
  return () => {};
}

// ------------------------------------------------------------ construction

const options: RealtimeClientOptions = {
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
  sseUrl: 'https://example.test/sse',
  fetch: globalThis.fetch,
};

/** A WebSocket of one's own (e.g. the `ws` package in old Node). */
class MyWebSocket implements WebSocketLike {
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  constructor(readonly url: string) {}
  send(_data: string): void {}
  close(_code?: number, _reason?: string): void {}
}
const ctor: WebSocketConstructor = MyWebSocket;

const inBrowser = new RealtimeClient();
const client = new RealtimeClient('wss://example.test/ws', { ...options, WebSocket: ctor });
const tutorial: RealtimeClient = new RealtimeClientDefault('ws://localhost:8080/ws');
// @ts-expect-error an unknown option
new RealtimeClient('ws://x/ws', { reconnectDelay: 1 });
// @ts-expect-error options are numbers
new RealtimeClient('ws://x/ws', { requestTimeout: '10s' });

// ------------------------------------------------------------ properties

expectType(client.url)<string>();
expectType(client.options.requestTimeout)<number>();
expectType(client.options.random)<() => number>();
expectType(client.transport)<Transport | null>();
expectType(sseUrlFor('ws://x/ws'))<string>();
// @ts-expect-error an unknown transport
new RealtimeClient('ws://x/ws', { transports: ['long-polling'] });
expectType(client.options.WebSocket)<WebSocketConstructor | undefined>();
expectType(client.ws)<WebSocketLike | null>();
if (client.ws) {
  expectType(client.ws.readyState)<number>();
  client.ws.send('{"type":"ping"}');
  client.ws.close(1000, 'bye');
}
expectType(client.reconnectAttempts)<number>();
client.maxReconnectAttempts = 5;
expectType(client.state)<ConnectionState>();
expectType(client.clientId)<string | null>();
expectType(client.instanceId)<string | null>();
expectType(client.subscriptions)<Map<string, Subscription>>();
expectType(client.connected)<boolean>();
expectType(client.listeners.get('state'))<Array<(...args: any[]) => void> | undefined>();
// @ts-expect-error the state is the client's to change
client.state = 'open';
// @ts-expect-error so is `connected`
client.connected = true;

// ------------------------------------------------------------ events

client.on('state', (state, info: StateInfo) => {
  expectType(state)<ConnectionState>();
  const { attempt, delay, code, reason, gaveUp, clientId, instanceId } = info;
  void [attempt, delay, code, reason, gaveUp, clientId, instanceId];
});
client.on('recovery-failed', (e: RecoveryFailedEvent) => {
  expectType(e.previous)<StreamPosition>();
  expectType(e.frame)<SubscribedFrame>();
  void [e.type, e.channel, e.epoch, e.offset];
});
client.on('subscription-error', (e: SubscriptionErrorEvent) => {
  expectType(e.error)<SwitchboardError>();
  void e.channel;
});
client.on('socket-error', (e) => expectType(e)<Event>());
client.on('connected', (f: ConnectedFrame) => void [f.clientId, f.message, f.instanceId]);
client.on('broadcast', (f: BroadcastFrame) => void [f.senderId, f.data, f.timestamp]);
client.on('direct', (f: DirectFrame) => void [f.senderId, f.data, f.timestamp]);
client.on('ack', (f: AckFrame) => void [f.ref, f.channel, f.offset]);
client.on('subscribed', (f) => void [f.channel, f.epoch, f.offset, f.recovered, f.acked, f.ref]);
client.on('unsubscribed', (f: UnsubscribedFrame) => void [f.channel, f.ref]);
client.on('message', (f) => {
  expectType(f)<MessageFrame>();
  expectType(f.senderId)<string | null>();
  void [f.channel, f.data, f.offset, f.epoch, f.timestamp];
});
client.on('presence', (f: PresenceFrame) => {
  const m: PresenceMember | undefined = f.members[0];
  void [f.channel, f.count, f.ref, m?.clientId, m?.userId];
});
client.on('join', (f: JoinLeaveFrame) => void [f.type, f.channel, f.clientId, f.userId]);
client.on('leave', (f: JoinLeaveFrame) => void f.clientId);
client.on('history', (f: HistoryFrame) => {
  const p: Publication | undefined = f.publications[0];
  void [f.channel, f.epoch, f.offset, f.ref, p?.offset, p?.data, p?.senderId, p?.timestamp];
});
client.on('pong', (f: PongFrame) => void f.ref);
client.on('authenticated', (f: AuthenticatedFrame) => void [f.userId, f.expiresAt, f.ref]);
client.on('error', (f: ErrorFrame) => {
  const code: ServerErrorCode | string = f.code;
  void [code, f.message, f.ref];
});
// The tutorial's custom frame types: any other name, with an untyped frame.
const onCustom = (frame: any) => void frame;
client.on('chat', onCustom).off('chat', onCustom).off('chat');
// @ts-expect-error a frame handler gets the frame of its type
client.on('message', (f: PresenceFrame) => void f);

const everyFrame: { [K in keyof FrameMap]: FrameMap[K]['type'] } = {
  connected: 'connected',
  broadcast: 'broadcast',
  direct: 'direct',
  ack: 'ack',
  subscribed: 'subscribed',
  unsubscribed: 'unsubscribed',
  message: 'message',
  presence: 'presence',
  join: 'join',
  leave: 'leave',
  history: 'history',
  pong: 'pong',
  authenticated: 'authenticated',
  error: 'error',
};
const anyFrame: AnyFrame = { type: 'pong' };
const json: Json = { list: [1, 'two', null, true, { nested: 3.5 }] };
const clientEvents: (keyof ClientEventMap)[] = ['state', 'recovery-failed', 'subscription-error', 'socket-error'];
const subEvents: (keyof SubscriptionEventMap)[] = ['message', 'subscribed', 'recovery-failed', 'join', 'leave', 'error'];
void [everyFrame, anyFrame, json, clientEvents, subEvents, inBrowser, tutorial];

// ------------------------------------------------------------ requests

interface Chat {
  text: string;
}

async function requests(): Promise<void> {
  expectType(await client.connect())<ConnectedFrame>();
  const timeout: RequestOptions = { timeout: 2_000 };
  expectType(await client.ping())<PongFrame>();
  expectType(await client.ping(timeout))<PongFrame>();
  expectType(await client.broadcast({ hello: 'all' }))<AckFrame>();
  expectType(await client.broadcast(null, timeout))<AckFrame>();
  expectType(await client.direct('c1', 'hi'))<AckFrame>();
  expectType(await client.direct('c1', 'hi', timeout))<AckFrame>();
  const ack = await client.publish('chat:lobby', { text: 'hi' }, timeout);
  expectType(ack.offset)<number>();
  expectType(ack.channel)<string>();
  expectType(await client.presence('chat:lobby', timeout))<PresenceFrame>();
  const since: StreamPosition = { epoch: 'e1', offset: 3 };
  const historyOptions: HistoryOptions = { since, limit: 10, timeout: 1_000 };
  const history = await client.history<Chat>('chat:lobby', historyOptions);
  expectType(history.publications[0]?.data)<Chat>();
  expectType(await client.history('chat:lobby'))<HistoryFrame<Json>>();
  const newest: HistoryOptions = { limit: 50, reverse: true };
  expectType(await client.history<Chat>('chat:lobby', newest))<HistoryFrame<Chat>>();
  const conditional: PublishOptions = { idempotencyKey: 'job-1', expectedOffset: 41, timeout: 1_000 };
  expectType((await client.publish('chat:lobby', { text: 'once' }, conditional)).offset)<number>();

  // Subscriptions.
  const subscribeOptions: SubscribeOptions = { since, timeout: 1_000 };
  const subscribed = await client.subscribe<Chat>(
    'chat:lobby',
    (m) => expectType(m.data)<Chat>(),
    subscribeOptions,
  );
  expectType(subscribed)<SubscribedFrame>();
  await client.subscribe('news:today');
  const sub = client.subscription('chat:lobby');
  expectType(sub)<Subscription | undefined>();
  if (sub) {
    expectType(sub.client)<RealtimeClient>();
    expectType(sub.channel)<string>();
    expectType(sub.state)<'pending' | 'subscribed' | 'unsubscribed'>();
    expectType(sub.epoch)<string | null>();
    expectType(sub.offset)<number | null>();
    expectType(sub.active)<boolean>();
    expectType(sub.acked)<boolean>();
    expectType(sub.position)<StreamPosition | null>();
    expectType(sub.listeners)<Map<string, Array<(...args: any[]) => void>>>();
    sub
      .on('message', (m) => expectType(m)<MessageFrame>())
      .on('subscribed', (f) => expectType(f)<SubscribedFrame>())
      .on('recovery-failed', (e) => expectType(e)<RecoveryFailedEvent>())
      .on('join', (f) => expectType(f)<JoinLeaveFrame>())
      .on('leave', (f) => expectType(f)<JoinLeaveFrame>())
      .on('error', (e) => expectType(e)<SwitchboardError>())
      .off('message');
    // @ts-expect-error a subscription has only its own events
    sub.on('broadcast', () => {});
    expectType(await sub.unsubscribe())<UnsubscribedFrame | null>();
  }
  expectType(await client.unsubscribe('news:today', timeout))<UnsubscribedFrame | null>();
  // A Subscription is made by the client; the constructor is declared so
  // the runtime check can compare it, and it takes what the client passes.
  const own = new Subscription(client, 'x:y', since);
  void own;

  // Authentication in a frame (docs/protocol.md): the tutorial's send.
  client.send('auth', undefined, { token: 'eyJ…', id: 'auth-1' });
  const serverCodes: ServerErrorCode[] = ['rate_limited', 'invalid_token', 'token_expired', 'permission_denied'];
  void serverCodes;

  // The tutorial's send.
  expectType(client.send('chat', { text: 'hi' }))<boolean>();
  expectType(client.send('typing'))<boolean>();
  client.send('chat', 'hi', { room: 'lobby' });
  // @ts-expect-error publish needs the data
  await client.publish('chat:lobby');
  // @ts-expect-error a channel is a string
  await client.subscribe(42);

  // Errors.
  try {
    await client.direct('nobody', 1);
  } catch (err) {
    if (err instanceof SwitchboardError) {
      const code: ServerErrorCode | ClientErrorCode | string = err.code;
      expectType(err.name)<'SwitchboardError'>();
      const frame: ErrorFrame | undefined = err.frame;
      const ref: RequestId | undefined = err.ref;
      void [code, frame, ref, err.message, err.stack];
    }
  }
  const mine = new SwitchboardError('timeout', 'no reply');
  const fromServer = new SwitchboardError('unknown_target', 'gone', { type: 'error', code: 'unknown_target', message: 'gone' });
  const clientCodes: ClientErrorCode[] = ['timeout', 'disconnected', 'closed', 'queue_full', 'unsubscribed'];
  void [mine instanceof Error, fromServer, clientCodes];

  client.close();
  client.close(1000, 'bye');
}
void requests;

// ------------------------------------------------------------ helpers

expectType(parseRetryHint('going away retry=1500'))<number | null>();
parseRetryHint(null);
parseRetryHint(undefined);
