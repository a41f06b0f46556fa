// Type declarations for switchboard.js (@switchboard/client).
// The wire protocol is described in docs/protocol.md.

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A request id / reply ref. The client uses increasing numbers. */
export type RequestId = number | string;

/** A position in a channel's stream. */
export interface StreamPosition {
  epoch: string;
  offset: number;
}

// ------------------------------------------------------------------ frames

export interface ConnectedFrame {
  type: 'connected';
  clientId: string;
  message: string;
  instanceId?: string;
  /** SSE connections only: the id the client posts its frames with. */
  session?: string;
}

export interface BroadcastFrame<T = Json> {
  type: 'broadcast';
  senderId: string;
  data: T;
  timestamp: number;
}

export interface DirectFrame<T = Json> {
  type: 'direct';
  senderId: string;
  data: T;
  timestamp: number;
}

export interface AckFrame {
  type: 'ack';
  ref: RequestId;
  /** Present for a publish. */
  channel?: string;
  /** Present for a publish: the publication's offset. */
  offset?: number;
}

export interface SubscribedFrame {
  type: 'subscribed';
  channel: string;
  epoch: string;
  /** Offset of the newest publication in the channel (0 if none). */
  offset: number;
  /** Present when the subscribe carried `since`. */
  recovered?: boolean;
  /** True in namespaces with acknowledged (at-least-once) delivery. */
  acked?: boolean;
  ref?: RequestId;
}

export interface UnsubscribedFrame {
  type: 'unsubscribed';
  channel: string;
  ref?: RequestId;
}

export interface MessageFrame<T = Json> {
  type: 'message';
  channel: string;
  data: T;
  /** null for a publication made through the server's HTTP API. */
  senderId: string | null;
  offset: number;
  epoch: string;
  timestamp: number;
}

export interface PresenceMember {
  clientId: string;
  userId: string | null;
  /** Display name: the token's `name` claim, or the `?name=` of a connection without a token (unverified). */
  name?: string;
}

export interface PresenceFrame {
  type: 'presence';
  channel: string;
  members: PresenceMember[];
  count: number;
  ref?: RequestId;
}

export interface JoinLeaveFrame {
  type: 'join' | 'leave';
  channel: string;
  clientId: string;
  userId: string | null;
  /** As in {@link PresenceMember}. */
  name?: string;
}

export interface Publication<T = Json> {
  offset: number;
  data: T;
  senderId: string | null;
  timestamp: number;
}

export interface HistoryFrame<T = Json> {
  type: 'history';
  channel: string;
  /** Oldest first. */
  publications: Publication<T>[];
  /** The stream's current top. */
  epoch: string;
  offset: number;
  ref?: RequestId;
}

/** The reply to `{"type":"auth","token":…}` (docs/protocol.md, Authentication). */
export interface AuthenticatedFrame {
  type: 'authenticated';
  /** The token's `sub`. */
  userId: string;
  /** The token's `exp`, in seconds since the Unix epoch. */
  expiresAt: number;
  ref?: RequestId;
}

export interface PongFrame {
  type: 'pong';
  ref?: RequestId;
}

/** Protocol error codes (docs/protocol.md). */
export type ServerErrorCode =
  | 'invalid_json'
  | 'invalid_frame'
  | 'unknown_type'
  | 'binary_not_supported'
  | 'unknown_target'
  | 'bad_channel'
  | 'unknown_namespace'
  | 'not_subscribed'
  | 'already_subscribed'
  | 'too_many_subscriptions'
  | 'history_disabled'
  | 'presence_disabled'
  | 'publish_not_allowed'
  | 'bus_unavailable'
  | 'rate_limited'
  | 'invalid_token'
  | 'token_expired'
  | 'permission_denied'
  | 'broadcast_not_allowed'
  | 'direct_not_allowed'
  | 'recipient_busy'
  | 'channel_limit'
  | 'offset_mismatch'
  | 'invalid_idempotency_key'
  | 'duplicate'
  | 'unsupported'
  | 'proxy_unavailable'
  | 'proxy_busy'
  | 'rpc_not_available'
  | 'internal';

/**
 * Codes the client produces itself:
 * - `timeout`: no reply within the request timeout
 * - `disconnected`: the connection dropped while the request was in flight
 *   (it may or may not have been carried out; it is not retried)
 * - `closed`: `close()` was called, or reconnecting gave up
 * - `queue_full`: not connected and `queueWhileDisconnected` requests already wait
 * - `unsubscribed`: `unsubscribe()` was called before the subscribe was confirmed
 */
export type ClientErrorCode = 'timeout' | 'disconnected' | 'closed' | 'queue_full' | 'unsubscribed';

export interface ErrorFrame {
  type: 'error';
  code: ServerErrorCode | string;
  message: string;
  /** `offset_mismatch`: the channel's current newest offset. */
  offset?: number;
  /** `offset_mismatch`: the channel's current epoch. */
  epoch?: string;
  ref?: RequestId;
}

/** Every frame the server sends, by `type`. */
export interface FrameMap {
  connected: ConnectedFrame;
  broadcast: BroadcastFrame;
  direct: DirectFrame;
  ack: AckFrame;
  subscribed: SubscribedFrame;
  unsubscribed: UnsubscribedFrame;
  message: MessageFrame;
  presence: PresenceFrame;
  join: JoinLeaveFrame;
  leave: JoinLeaveFrame;
  history: HistoryFrame;
  pong: PongFrame;
  authenticated: AuthenticatedFrame;
  error: ErrorFrame;
}

export type AnyFrame = FrameMap[keyof FrameMap];

// ------------------------------------------------------------------ client events

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Second argument of a `'state'` handler. */
export interface StateInfo {
  /** Reconnect attempt number (on `connecting` / `reconnecting`). */
  attempt?: number;
  /** Delay before the next attempt, ms (on `reconnecting`). */
  delay?: number;
  /** Close code of the connection that ended (on `reconnecting` / `closed`). */
  code?: number;
  /** Close reason of the connection that ended. */
  reason?: string;
  /** True when `maxReconnectAttempts` was reached (on `closed`). */
  gaveUp?: boolean;
  /** On `open`. */
  clientId?: string | null;
  instanceId?: string | null;
}

export interface RecoveryFailedEvent {
  type: 'recovery-failed';
  channel: string;
  /** The stream position the subscription goes on from (live). */
  epoch: string;
  offset: number;
  /** The position the client asked to resume from. */
  previous: StreamPosition;
  /** The `subscribed` frame (with `recovered: false`). */
  frame: SubscribedFrame;
}

export interface SubscriptionErrorEvent {
  channel: string;
  error: SwitchboardError;
}

/** Events emitted by the client that are not server frames. */
export interface ClientEventMap {
  state: [state: ConnectionState, info: StateInfo];
  'recovery-failed': [event: RecoveryFailedEvent];
  'subscription-error': [event: SubscriptionErrorEvent];
  /** The WebSocket's `error` event (a close follows). */
  'socket-error': [event: Event];
}

export interface SubscriptionEventMap {
  message: [frame: MessageFrame];
  subscribed: [frame: SubscribedFrame];
  'recovery-failed': [event: RecoveryFailedEvent];
  join: [frame: JoinLeaveFrame];
  leave: [frame: JoinLeaveFrame];
  /** The server ended the subscription (a refreshed token no longer grants it). */
  unsubscribed: [frame: UnsubscribedFrame];
  error: [error: SwitchboardError];
}

// ------------------------------------------------------------------ options

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface RealtimeClientOptions {
  /** WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Request timeout, ms, counted from when the request is written. Default 10000. */
  requestTimeout?: number;
  /** Consecutive failed reconnects before giving up. Default Infinity. */
  maxReconnectAttempts?: number;
  /** Backoff base, ms. Default 500. */
  reconnectBaseDelay?: number;
  /** Backoff cap, ms. Default 30000. */
  reconnectMaxDelay?: number;
  /** Silence (nothing received) before a `ping` probe, ms. Default 45000; 0 or Infinity disables. */
  heartbeatTimeout?: number;
  /** How long the probe may go unanswered before the connection is dropped, ms. Default 5000. */
  heartbeatPongTimeout?: number;
  /** A handshake not completed within this many ms counts as a failed attempt. Default 10000. */
  connectTimeout?: number;
  /** Most frames/requests queued while disconnected. Default 100. */
  queueWhileDisconnected?: number;
  /** Random source in [0, 1) for the jitter (tests). Default Math.random. */
  random?: () => number;
  /**
   * The transports to try, in order (default `['websocket', 'sse']`): when
   * one cannot open, the next is tried at once; every reconnect after a
   * connection that opened starts again with the first.
   */
  transports?: Transport[];
  /** The SSE stream's URL. Default: from the URL, `…/ws` → `…/sse` (ws → http). */
  sseUrl?: string;
  /** The `fetch` the SSE transport uses. Default: the global one. */
  fetch?: typeof fetch;
}

export interface RequestOptions {
  /** Overrides `requestTimeout` for this request. */
  timeout?: number;
}

export interface HistoryOptions extends RequestOptions {
  since?: StreamPosition;
  limit?: number;
  /** The newest `limit` publications (after `since`), newest first. */
  reverse?: boolean;
}

export interface PublishOptions extends RequestOptions {
  /** 1-128 bytes: a repeat within the namespace's window publishes nothing and gets the first ack. */
  idempotencyKey?: string;
  /** Publish only if the channel's newest offset is this one (else `offset_mismatch`). */
  expectedOffset?: number;
}

export interface SubscribeOptions extends RequestOptions {
  /** Resume from a known position (replays what was missed, if retained). */
  since?: StreamPosition;
}

// ------------------------------------------------------------------ classes

export class SwitchboardError extends Error {
  constructor(code: string, message?: string, frame?: ErrorFrame);
  readonly name: 'SwitchboardError';
  code: ServerErrorCode | ClientErrorCode | string;
  /** The `error` frame, when the server sent one. */
  frame?: ErrorFrame;
  ref?: RequestId;
}

declare class Emitter<M extends { [K in keyof M]: any[] }> {
  /** Event type → its handlers, in the order added (as in the tutorial's client). Use `on`/`off`. */
  readonly listeners: Map<string, Array<(...args: any[]) => void>>;
  on<K extends keyof M & string>(type: K, handler: (...args: M[K]) => void): this;
  off<K extends keyof M & string>(type: K, handler?: (...args: M[K]) => void): this;
}

export class Subscription extends Emitter<SubscriptionEventMap> {
  /** Made by `client.subscribe()`; an app does not construct one itself. */
  constructor(client: RealtimeClient, channel: string, since?: StreamPosition);
  readonly client: RealtimeClient;
  readonly channel: string;
  state: 'pending' | 'subscribed' | 'unsubscribed';
  /** Epoch of the last delivered publication (or of the stream at subscribe time). */
  epoch: string | null;
  /** Offset of the last delivered publication (or the stream top at subscribe time). */
  offset: number | null;
  /** True while confirmed on the current connection. */
  active: boolean;
  /**
   * True when the namespace uses acknowledged delivery: the client then
   * acknowledges every publication once the handlers have run.
   */
  acked: boolean;
  readonly position: StreamPosition | null;
  unsubscribe(): Promise<UnsubscribedFrame | null>;
}

type ClientEvents = { [K in keyof FrameMap]: [frame: FrameMap[K]] } & ClientEventMap;

export class RealtimeClient extends Emitter<ClientEvents & Record<string, any[]>> {
  /**
   * @param url `ws(s)://host/ws` (or the bare host, as in the tutorial). In a
   *   browser it defaults to `ws(s)://<location.host>/ws`.
   */
  constructor(url?: string, options?: RealtimeClientOptions);

  readonly url: string;
  readonly options: Required<Omit<RealtimeClientOptions, 'WebSocket' | 'sseUrl' | 'fetch'>> & {
    WebSocket?: WebSocketConstructor;
    sseUrl?: string;
    fetch?: typeof fetch;
  };
  /** The current socket, or null. */
  ws: WebSocketLike | null;
  reconnectAttempts: number;
  maxReconnectAttempts: number;
  readonly state: ConnectionState;
  /** Set from the `connected` frame; null while not connected. Changes on every reconnect. */
  readonly clientId: string | null;
  readonly instanceId: string | null;
  /** The transport of the current connection; null while not connected. */
  readonly transport: Transport | null;
  readonly subscriptions: Map<string, Subscription>;
  /** True when open and ready to write. */
  readonly connected: boolean;

  /**
   * Open the connection and keep it open. Resolves with the `connected`
   * frame; rejects only if `close()` is called, or reconnecting gives up, first.
   */
  connect(): Promise<ConnectedFrame>;
  /** Close for good: no reconnect; pending and queued requests reject with `closed`. */
  close(code?: number, reason?: string): void;

  /**
   * The tutorial's send: `{type, data, ...extra}`. Queued while disconnected.
   * Returns false if dropped (queue full, or client closed).
   */
  send(type: string, data?: unknown, extra?: Record<string, unknown>): boolean;

  ping(opts?: RequestOptions): Promise<PongFrame>;
  broadcast(data: unknown, opts?: RequestOptions): Promise<AckFrame>;
  direct(targetId: string, data: unknown, opts?: RequestOptions): Promise<AckFrame>;
  publish(channel: string, data: unknown, opts?: PublishOptions): Promise<AckFrame & { channel: string; offset: number }>;
  presence(channel: string, opts?: RequestOptions): Promise<PresenceFrame>;
  history<T = Json>(channel: string, opts?: HistoryOptions): Promise<HistoryFrame<T>>;

  subscribe<T = Json>(
    channel: string,
    handler?: (message: MessageFrame<T>) => void,
    opts?: SubscribeOptions,
  ): Promise<SubscribedFrame>;
  unsubscribe(channel: string, opts?: RequestOptions): Promise<UnsubscribedFrame | null>;
  subscription(channel: string): Subscription | undefined;
}

/** Parse `retry=<ms>` out of a close reason. */
export function parseRetryHint(reason: string | undefined | null): number | null;

/** A way to reach the server: a WebSocket, or Server-Sent Events with POSTs. */
export type Transport = 'websocket' | 'sse';

/** The SSE stream's URL for a WebSocket URL: `ws(s)://host/…/ws?q` → `http(s)://host/…/sse?q`. */
export function sseUrlFor(wsUrl: string): string;

export default RealtimeClient;
