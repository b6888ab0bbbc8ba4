// The connection to a livegrid server: subscriptions that stay correct through reconnects.
//
// One WebSocket carries every subscription. Each subscription's result is a LiveResult that
// applies the server's messages and checks `seq`; a gap or a message that does not fit makes
// the client subscribe again (a fresh result) rather than show a wrong one. When the
// connection drops, the client reconnects with exponential backoff and jitter and resumes
// every subscription with its token and last applied seq: the server sends exactly what was
// missed. States: `connecting`, `open`, `resuming`, `offline`, `closed`; `open` means every
// subscription is current (resumed ones have had what they missed, new ones their result).

import { ApplyError, LiveResult } from './live-result.js';

/** Error codes after which subscribing again (later) can succeed. */
const RETRYABLE = new Set(['resubscribe', 'stale_snapshot', 'over_capacity', 'rate_limited', 'unavailable']);

const DEFAULTS = {
  backoff: { initialMs: 250, maxMs: 30_000, factor: 2, jitter: 0.5 },
  heartbeatMs: 20_000,
  stableMs: 10_000,
};

/** Calls a user's callback; what it throws is reported without breaking the client's state. */
function safely(callback, ...args) {
  if (!callback) return;
  try {
    callback(...args);
  } catch (error) {
    // Reported where the platform reports errors (the console, window.onerror), not thrown
    // into the client.
    if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
    else console.error(error);
  }
}

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
   * @param {number} [options.stableMs] how long a connection must last before the backoff
   *   starts over
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
    this.stable = null;
    /** @type {Promise<void> | null} a re-authentication under way */
    this.reauth = null;
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
    safely(listener, this.state);
    return () => this.stateListeners.delete(listener);
  }

  /**
   * Subscribes to a live query, or to a live aggregation pipeline (`{ns, pipeline: [...]}`).
   * @param {{ns: string, filter?: object, sort?: object, skip?: number, limit?: number, projection?: object, pipeline?: object[]}} query
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
    for (const q of this.queries) {
      q.ended = true;
      clearTimeout(q.retryTimer);
    }
    this.queries.clear();
    this.byWireId.clear();
    clearTimeout(this.timer);
    clearTimeout(this.stable);
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
    for (const listener of this.stateListeners) safely(listener, state);
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
      if ([...this.queries].some((q) => q.token)) this.#setState('resuming');
      this.byWireId.clear();
      for (const q of this.queries) this.#start(q);
      // Replies come in order: the pong follows every resumed subscription's missed messages
      // (a resume the server cannot honour is answered by a fresh result, later).
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
    clearTimeout(this.stable);
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
    // A fresh subscription is current once its result arrives; a resumed one at the pong.
    q.awaiting = !q.token;
    q.lastSubscribe = message;
    this.#send(message);
  }

  /** `open` once the pong came and every subscription is current. */
  #maybeOpen() {
    if (this.pendingPong || !this.socket) return;
    if ([...this.queries].some((q) => q.awaiting)) return;
    this.#setState('open');
  }

  /** A subscription answered (result, delta or error). */
  answered(q) {
    if (q.awaiting) {
      q.awaiting = false;
      this.#maybeOpen();
    }
  }

  /** Sends a fresh token (from the token function) to the server, once for many callers. */
  reauthenticate() {
    if (typeof this.options.token !== 'function') return null;
    if (!this.reauth) {
      this.reauth = (async () => {
        try {
          const token = await this.options.token();
          if (token) this.#send({ type: 'auth', token });
        } finally {
          this.reauth = null;
        }
      })();
    }
    return this.reauth;
  }

  /** Subscribes `q` afresh (no resume) under a new wire id. */
  restart(q) {
    if (q.ended || !this.queries.has(q)) return;
    this.byWireId.delete(q.wireId);
    q.token = null;
    q.wireId = null;
    this.#start(q);
  }

  /** Sends the subscriptions that got no answer again, after a backoff (some were dropped). */
  #resendUnanswered() {
    clearTimeout(this.resendTimer);
    this.resendTimer = setTimeout(() => {
      for (const q of this.queries) {
        if (q.awaiting && q.lastSubscribe && this.byWireId.get(q.wireId) === q) this.#send(q.lastSubscribe);
      }
    }, backoffDelay(1, this.options.backoff, this.options.random));
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
    clearTimeout(q.retryTimer);
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
          // The backoff starts over once a connection has lasted (not at its first answer: a
          // server that accepts and then drops every connection must not be hammered).
          clearTimeout(this.stable);
          this.stable = setTimeout(() => {
            this.attempt = 0;
          }, this.options.stableMs);
          this.#maybeOpen();
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
          // A dropped message (too many at once): send what got no answer again, later.
          if (message.code === 'rate_limited') this.#resendUnanswered();
          safely(this.options.onError, message);
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
    clearTimeout(q.retryTimer);
    q.retryTimer = setTimeout(() => {
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
    /** Whether a fresh subscription waits for its result. */
    this.awaiting = false;
    this.lastSubscribe = null;
    this.retryTimer = null;
    this.reauthenticated = false;
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
    this.grid.answered(this);
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
      this.reauthenticated = false;
    }
    if (message.type === 'result') this.pending = [];
    else this.pending.push(message);
    // Between the deltas of one transaction the result is not a state the data was in: show
    // it (and call onDelta for each of them) once the transaction is whole.
    if (!this.live.whole) return;
    this.result = this.live.docs.slice();
    const deltas = this.pending;
    this.pending = [];
    if (message.type === 'result') safely(this.handlers.onResult, this.result);
    for (const delta of deltas) safely(this.handlers.onDelta, delta, this.result);
    for (const run of this.listeners) safely(run, this.result);
  }

  failed(error) {
    if (error.code === 'duplicate_subscription') {
      // Our wire ids are unique: this is a subscribe sent again after a dropped message, and
      // the server holds the subscription already; its result comes (or came) on its own.
      return;
    }
    this.grid.answered(this);
    if (error.code === 'unauthorized' && !this.reauthenticated) {
      // An expired token: authenticate with a fresh one and subscribe again, once.
      const fresh = this.grid.reauthenticate();
      if (fresh) {
        this.reauthenticated = true;
        fresh.then(
          () => this.grid.restart(this),
          () => this.failed(error),
        );
        return;
      }
    }
    this.error = error;
    safely(this.handlers.onError, error);
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
