// The connection to a livegrid server: subscriptions that stay correct through reconnects.
//
// One WebSocket carries every subscription. Each subscription's result is a LiveResult that
// applies the server's messages and checks `seq`; a gap or a message that does not fit makes
// the client subscribe again (a fresh result) rather than show a wrong one. When the
// connection drops, the client reconnects with exponential backoff and jitter and resumes
// every subscription with its token and last applied seq: the server sends exactly what was
// missed. States: `connecting`, `open`, `resuming`, `offline`, `closed`.

import { ApplyError, LiveResult } from './live-result.js';

/** Error codes after which subscribing again (later) can succeed. */
const RETRYABLE = new Set(['resubscribe', 'stale_snapshot', 'over_capacity', 'rate_limited', 'unavailable', 'internal']);

const DEFAULTS = {
  backoff: { initialMs: 250, maxMs: 30_000, factor: 2, jitter: 0.5 },
  heartbeatMs: 20_000,
};

/**
 * The delay before reconnection attempt `attempt` (0-based): exponential, capped, with the
 * upper `jitter` share of it random so that clients of a restarted server do not return in
 * lockstep.
 * @param {number} attempt
 * @param {{initialMs: number, maxMs: number, factor: number, jitter: number}} backoff
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const base = Math.min(backoff.maxMs, backoff.initialMs * backoff.factor ** attempt);
  return Math.round(base * (1 - backoff.jitter * random()));
}

/** A WebSocket URL for `url`: `http(s)://host` becomes `ws(s)://host/v1/ws`. */
export function socketUrl(url) {
  const u = new URL(url, globalThis.location?.href);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '/' || u.pathname === '') u.pathname = '/v1/ws';
  return u.toString();
}

export class LiveGrid {
  /**
   * @param {string} url the server (`http://host:8080`) or its WebSocket endpoint
   * @param {object} [options]
   * @param {string | (() => string | Promise<string>)} [options.token] a bearer token (JWT), or a
   *   function returning a fresh one at each connection
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket implementation (Node < 22: `ws`)
   * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number}} [options.backoff]
   * @param {number} [options.heartbeatMs] how often to ping; a connection silent for two
   *   intervals is given up and reconnected
   * @param {(state: string) => void} [options.onState]
   * @param {(error: {code: string, message: string}) => void} [options.onError] errors that
   *   concern no subscription
   * @param {() => number} [options.random] for tests
   */
  constructor(url, options = {}) {
    this.url = socketUrl(url);
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new Error('no WebSocket implementation: pass options.WebSocket');
    /** @type {'connecting'|'open'|'resuming'|'offline'|'closed'} */
    this.state = 'connecting';
    /** @type {Map<string, LiveQuery>} by wire id */
    this.byWireId = new Map();
    /** @type {Set<LiveQuery>} */
    this.queries = new Set();
    this.stateListeners = new Set();
    if (options.onState) this.stateListeners.add(options.onState);
    this.attempt = 0;
    this.nextWireId = 1;
    this.socket = null;
    this.timer = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.pendingPong = false;
    this.onOnline = () => {
      if (this.state === 'offline') this.#connect();
    };
    globalThis.addEventListener?.('online', this.onOnline);
    this.#connect();
  }

  /**
   * Calls `listener` with the connection state now and at every change; returns a function
   * that stops it.
   * @param {(state: string) => void} listener
   */
  onState(listener) {
    this.stateListeners.add(listener);
    listener(this.state);
    return () => this.stateListeners.delete(listener);
  }

  /**
   * Subscribes to a live query.
   * @param {{ns: string, filter?: object, sort?: object, skip?: number, limit?: number, projection?: object}} query
   * @param {object} [handlers]
   * @param {(docs: object[]) => void} [handlers.onResult] a fresh result (the first, or after a re-sync)
   * @param {(delta: object, docs: object[]) => void} [handlers.onDelta] each change, once it is
   *   applied and the result is whole (the deltas of one transaction arrive together)
   * @param {(error: {code: string, message: string}) => void} [handlers.onError]
   */
  subscribe(query, handlers = {}) {
    if (this.state === 'closed') throw new Error('this LiveGrid is closed');
    const live = new LiveQuery(this, query, handlers);
    this.queries.add(live);
    this.#start(live);
    return live;
  }

  /** Ends every subscription and the connection; nothing reconnects after it. */
  close() {
    for (const q of this.queries) q.ended = true;
    this.queries.clear();
    this.byWireId.clear();
    clearTimeout(this.timer);
    clearInterval(this.heartbeat);
    globalThis.removeEventListener?.('online', this.onOnline);
    const socket = this.socket;
    this.socket = null;
    this.#setState('closed');
    if (socket) socket.close(1000, 'client closed');
  }

  // -- internals -------------------------------------------------------------------------

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    for (const listener of this.stateListeners) listener(state);
  }

  async #connect() {
    if (this.state === 'closed') return;
    clearTimeout(this.timer);
    this.#setState('connecting');
    let token = this.options.token;
    try {
      if (typeof token === 'function') token = await token();
    } catch (e) {
      this.#lost();
      return;
    }
    if (this.state === 'closed') return;
    const socket = new this.WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.lastHeard = Date.now();
      if (token) this.#send({ type: 'auth', token });
      const resuming = [...this.queries].some((q) => q.token);
      this.#setState(resuming ? 'resuming' : 'open');
      this.byWireId.clear();
      for (const q of this.queries) this.#start(q);
      // Replies come in order: the pong follows every resumed subscription's missed messages.
      this.#send({ type: 'ping' });
      this.pendingPong = true;
      clearInterval(this.heartbeat);
      this.heartbeat = setInterval(() => this.#beat(), this.options.heartbeatMs);
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.lastHeard = Date.now();
      let message;
      try {
        message = JSON.parse(typeof event.data === 'string' ? event.data : String(event.data));
      } catch {
        return;
      }
      this.#receive(message);
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.#lost();
    };
    socket.onerror = () => {};
  }

  #beat() {
    if (!this.socket) return;
    if (Date.now() - this.lastHeard > 2 * this.options.heartbeatMs) {
      // Silent for two intervals: the network is gone without a close. Start over.
      const socket = this.socket;
      this.socket = null;
      try {
        socket.close(4000, 'no answer');
      } catch {}
      this.#lost();
      return;
    }
    this.#send({ type: 'ping' });
  }

  #lost() {
    clearInterval(this.heartbeat);
    if (this.state === 'closed') return;
    this.#setState('offline');
    const delay = backoffDelay(this.attempt, this.options.backoff, this.options.random);
    this.attempt += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.#connect(), delay);
  }

  #send(message) {
    if (this.socket && this.socket.readyState === 1) {
      this.socket.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  /** (Re)subscribes `q` under a new wire id: resuming when it has a token. */
  #start(q) {
    if (q.ended) return;
    if (!q.wireId || !q.token) q.wireId = `q${this.nextWireId++}`;
    this.byWireId.set(q.wireId, q);
    const message = { type: 'subscribe', id: q.wireId, ...q.query };
    if (q.token) message.resume = { token: q.token, seq: q.live.seq };
    this.#send(message);
  }

  /** Drops `q`'s copy and subscribes afresh (a gap or a delta that does not fit). */
  resync(q) {
    if (q.ended) return;
    this.byWireId.delete(q.wireId);
    this.#send({ type: 'unsubscribe', id: q.wireId });
    q.token = null;
    q.wireId = null;
    q.resyncs += 1;
    this.#start(q);
  }

  /** Ends `q` on the server. */
  end(q) {
    this.queries.delete(q);
    if (q.wireId) {
      this.byWireId.delete(q.wireId);
      this.#send({ type: 'unsubscribe', id: q.wireId });
    }
  }

  #receive(message) {
    switch (message.type) {
      case 'pong':
        if (this.pendingPong) {
          this.pendingPong = false;
          this.attempt = 0;
          this.#setState('open');
        }
        return;
      case 'result':
      case 'delta': {
        const q = this.byWireId.get(message.id);
        if (q) q.receive(message);
        return;
      }
      case 'error': {
        const q = message.id === undefined ? undefined : this.byWireId.get(message.id);
        if (!q) {
          this.options.onError?.(message);
          return;
        }
        q.failed(message);
        return;
      }
      default:
    }
  }

  /** Retries `q` after a backoff (a retryable error). */
  retryLater(q) {
    this.byWireId.delete(q.wireId);
    q.token = null;
    q.wireId = null;
    const delay = backoffDelay(Math.min(q.retries++, 8), this.options.backoff, this.options.random);
    setTimeout(() => {
      // Unless a reconnection started it again meanwhile.
      if (!q.ended && this.queries.has(q) && q.wireId === null) this.#start(q);
    }, delay);
  }
}

/** One live query: its current result and the ways to follow it. */
export class LiveQuery {
  constructor(grid, query, handlers) {
    this.grid = grid;
    this.query = { ...query };
    this.handlers = handlers;
    this.live = new LiveResult();
    /** The current result, in order (a new array at every change). */
    this.result = [];
    this.token = null;
    this.wireId = null;
    this.ended = false;
    this.resyncs = 0;
    this.retries = 0;
    /** The last error the server sent about this query, if any. */
    this.error = null;
    /** Deltas of a transaction not yet whole. */
    this.pending = [];
    this.listeners = new Set();
  }

  /** Whether a result has arrived. */
  get ready() {
    return this.live.started;
  }

  /** Ends the subscription. */
  unsubscribe() {
    if (this.ended) return;
    this.ended = true;
    this.grid.end(this);
  }

  /**
   * The observable form: calls `run(result)` now and after every change; returns a function
   * that stops it. Fits React's `useSyncExternalStore` (with {@link LiveQuery#getSnapshot}),
   * Svelte stores and Vue refs.
   * @param {(result: object[]) => void} run
   */
  subscribe(run) {
    this.listeners.add(run);
    run(this.result);
    return () => this.listeners.delete(run);
  }

  /** The current result (a stable array between changes). */
  getSnapshot = () => this.result;

  receive(message) {
    try {
      this.live.apply(message);
    } catch (e) {
      if (e instanceof ApplyError) {
        // The copy cannot be trusted any more: start over with a fresh result.
        this.grid.resync(this);
        return;
      }
      throw e;
    }
    if (message.type === 'result') {
      this.token = message.token ?? null;
      this.retries = 0;
      this.error = null;
    }
    if (message.type === 'result') this.pending = [];
    else this.pending.push(message);
    // Between the deltas of one transaction the result is not a state the data was in: show
    // it (and call onDelta for each of them) once the transaction is whole.
    if (!this.live.whole) return;
    this.result = this.live.docs.slice();
    if (message.type === 'result') this.handlers.onResult?.(this.result);
    for (const delta of this.pending) this.handlers.onDelta?.(delta, this.result);
    this.pending = [];
    for (const run of this.listeners) run(this.result);
  }

  failed(error) {
    this.error = error;
    this.handlers.onError?.(error);
    if (RETRYABLE.has(error.code)) {
      this.grid.retryLater(this);
    } else {
      // The query itself is refused (bad_query, unauthorized, ...): it stays ended.
      this.ended = true;
      this.grid.queries.delete(this);
      this.grid.byWireId.delete(this.wireId);
    }
  }
}
