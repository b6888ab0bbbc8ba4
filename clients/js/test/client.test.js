// The client against a scripted server (a fake WebSocket): subscription, seq gaps, resume,
// backoff, transactions, errors. The real server is exercised by the browser test
// (test/e2e/playground.mjs).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { LiveGrid, backoffDelay, socketUrl } from '../src/index.js';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A scripted server: every socket the client opens, and what it sent. */
class Script {
  constructor() {
    this.sockets = [];
    const script = this;
    this.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.sent = [];
        script.sockets.push(this);
      }
      send(text) {
        this.sent.push(JSON.parse(text));
      }
      close() {
        this.readyState = 3;
      }
      // Scripting.
      open() {
        this.readyState = 1;
        this.onopen?.();
      }
      deliver(message) {
        this.onmessage?.({ data: JSON.stringify(message) });
      }
      drop() {
        this.readyState = 3;
        this.onclose?.({ code: 1006 });
      }
      /** The client's messages of a type. */
      of(type) {
        return this.sent.filter((m) => m.type === type);
      }
    };
  }
  get last() {
    return this.sockets[this.sockets.length - 1];
  }
}

const options = (script, extra = {}) => ({
  WebSocket: script.WebSocket,
  backoff: { initialMs: 5, maxMs: 20 },
  random: () => 0,
  heartbeatMs: 60_000,
  ...extra,
});

const result = (id, docs, token = 'tok') => ({ type: 'result', id, seq: 1, position: 1, token, docs });
const add = (id, seq, n, index) => ({
  type: 'delta', id, seq, op: 'add', docId: n, doc: { _id: n }, index, cause: 'insert', position: seq,
});

test('subscribes, applies deltas and reports state', async () => {
  const script = new Script();
  const states = [];
  const grid = new LiveGrid('http://localhost:8080', options(script, { onState: (s) => states.push(s) }));
  assert.equal(script.last.url, 'ws://localhost:8080/v1/ws');
  const q = grid.subscribe({ ns: 'app.items', sort: { n: 1 }, limit: 2 });
  const seen = [];
  const stop = q.subscribe((docs) => seen.push(docs.map((d) => d._id)));
  script.last.open();
  const [subscribe] = script.last.of('subscribe');
  assert.deepEqual({ ...subscribe, id: undefined }, { type: 'subscribe', id: undefined, ns: 'app.items', sort: { n: 1 }, limit: 2 });
  script.last.deliver({ type: 'pong' });
  script.last.deliver(result(subscribe.id, [{ _id: 1 }]));
  script.last.deliver(add(subscribe.id, 2, 0, 0));
  assert.deepEqual(q.result.map((d) => d._id), [0, 1]);
  assert.deepEqual(seen, [[], [1], [0, 1]]);
  assert.equal(q.getSnapshot(), q.result);
  stop();
  assert.deepEqual(states, ['open']);
  grid.close();
  assert.equal(grid.state, 'closed');
});

test('a seq gap re-subscribes instead of showing a wrong result', () => {
  const script = new Script();
  const grid = new LiveGrid('ws://localhost:8080/v1/ws', options(script));
  const q = grid.subscribe({ ns: 'app.items' });
  script.last.open();
  const first = script.last.of('subscribe')[0].id;
  script.last.deliver(result(first, [{ _id: 1 }]));
  script.last.deliver(add(first, 3, 2)); // seq 2 never came
  assert.deepEqual(script.last.of('unsubscribe'), [{ type: 'unsubscribe', id: first }]);
  const again = script.last.of('subscribe')[1];
  assert.notEqual(again.id, first);
  assert.equal(again.resume, undefined, 'a fresh subscription, not a resume');
  // Late messages of the old subscription are ignored; the fresh result replaces the copy.
  script.last.deliver(add(first, 4, 3));
  script.last.deliver(result(again.id, [{ _id: 1 }, { _id: 2 }]));
  assert.deepEqual(q.result.map((d) => d._id), [1, 2]);
  assert.equal(q.resyncs, 1);
  grid.close();
});

test('reconnects with backoff and resumes with the token and the last seq', async () => {
  const script = new Script();
  const states = [];
  const grid = new LiveGrid('http://localhost:8080', options(script, { token: 'jwt', onState: (s) => states.push(s) }));
  const q = grid.subscribe({ ns: 'app.items' });
  script.last.open();
  assert.deepEqual(script.last.sent[0], { type: 'auth', token: 'jwt' });
  const id = script.last.of('subscribe')[0].id;
  script.last.deliver({ type: 'pong' });
  script.last.deliver(result(id, [], 'secret'));
  script.last.deliver(add(id, 2, 7));
  script.last.drop();
  assert.equal(grid.state, 'offline');
  await sleep(30);
  assert.equal(script.sockets.length, 2, 'one reconnection');
  script.last.open();
  assert.equal(grid.state, 'resuming');
  const resumed = script.last.of('subscribe')[0];
  assert.deepEqual(resumed, { type: 'subscribe', id, ns: 'app.items', resume: { token: 'secret', seq: 2 } });
  // The missed messages, then the pong that says the resume is complete.
  script.last.deliver(add(id, 3, 8));
  script.last.deliver({ type: 'pong' });
  assert.equal(grid.state, 'open');
  assert.deepEqual(q.result.map((d) => d._id), [7, 8]);
  assert.deepEqual(states, ['open', 'offline', 'connecting', 'resuming', 'open']);
  grid.close();
});

test('a server that stays down is retried less and less often', async () => {
  const delays = [0, 1, 2, 3, 4, 5, 10].map((attempt) =>
    backoffDelay(attempt, { initialMs: 250, maxMs: 30_000, factor: 2, jitter: 0.5 }, () => 0));
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 30_000]);
  const jittered = backoffDelay(3, { initialMs: 250, maxMs: 30_000, factor: 2, jitter: 0.5 }, () => 1);
  assert.equal(jittered, 1000, 'at most half of the delay is taken off');
  // Attempts count up while connections fail and start over once one opens.
  const script = new Script();
  const grid = new LiveGrid('http://localhost:8080', options(script, { backoff: { initialMs: 5, maxMs: 40 }, stableMs: 30 }));
  script.last.drop();
  await sleep(15);
  script.last.drop();
  assert.equal(grid.attempt, 2);
  await sleep(25);
  script.last.open();
  script.last.deliver({ type: 'pong' });
  assert.equal(grid.attempt, 2, 'a first answer is not enough: the connection must last');
  await sleep(45);
  assert.equal(grid.attempt, 0);
  grid.close();
  assert.equal(socketUrl('https://example.com'), 'wss://example.com/v1/ws');
});

test('the deltas of a transaction are shown together', () => {
  const script = new Script();
  const grid = new LiveGrid('http://localhost:8080', options(script));
  const deltas = [];
  const q = grid.subscribe({ ns: 'app.items' }, { onDelta: (d, docs) => deltas.push([d.seq, docs.length]) });
  script.last.open();
  const id = script.last.of('subscribe')[0].id;
  script.last.deliver(result(id, []));
  script.last.deliver({ ...add(id, 2, 1), more: true });
  assert.deepEqual(q.result, [], 'half a transaction is not shown');
  assert.deepEqual(deltas, []);
  script.last.deliver(add(id, 3, 2));
  assert.deepEqual(deltas, [[2, 2], [3, 2]]);
  grid.close();
});

test('errors: a refused query ends, a retryable one is subscribed again', async () => {
  const script = new Script();
  const errors = [];
  const grid = new LiveGrid('http://localhost:8080', options(script));
  const bad = grid.subscribe({ ns: 'app.items', filter: { $where: 'x' } }, { onError: (e) => errors.push(e.code) });
  const busy = grid.subscribe({ ns: 'app.items' });
  script.last.open();
  const [badId, busyId] = script.last.of('subscribe').map((m) => m.id);
  script.last.deliver({ type: 'error', id: badId, code: 'bad_query', message: 'unsupported operator $where' });
  script.last.deliver({ type: 'error', id: busyId, code: 'over_capacity', message: 'retry later' });
  assert.deepEqual(errors, ['bad_query']);
  assert.equal(bad.error.code, 'bad_query');
  await sleep(20);
  const retried = script.last.of('subscribe').slice(2);
  assert.equal(retried.length, 1, 'only the retryable one again');
  assert.notEqual(retried[0].id, busyId);
  script.last.deliver(result(retried[0].id, [{ _id: 1 }]));
  assert.equal(busy.result.length, 1);
  busy.unsubscribe();
  assert.deepEqual(script.last.of('unsubscribe').at(-1), { type: 'unsubscribe', id: retried[0].id });
  grid.close();
});

test('an expired token is replaced from the token function and the query subscribed again', async () => {
  const script = new Script();
  let issued = 0;
  const grid = new LiveGrid('http://localhost:8080', options(script, { token: () => `jwt${++issued}` }));
  const errors = [];
  const q = grid.subscribe({ ns: 'app.items' }, { onError: (e) => errors.push(e.code) });
  await sleep(5);
  script.last.open();
  const first = script.last.of('subscribe')[0].id;
  script.last.deliver(result(first, [{ _id: 1 }]));
  script.last.deliver({ type: 'error', id: first, code: 'unauthorized', message: 'the token expired' });
  await sleep(5);
  assert.deepEqual(script.last.of('auth').map((m) => m.token), ['jwt1', 'jwt2']);
  const again = script.last.of('subscribe')[1];
  assert.notEqual(again.id, first);
  assert.equal(again.resume, undefined);
  assert.deepEqual(errors, [], 'recovered without bothering the application');
  script.last.deliver(result(again.id, [{ _id: 1 }, { _id: 2 }]));
  assert.equal(q.result.length, 2);
  // Refused again with the fresh token: now it is the application's to handle.
  script.last.deliver({ type: 'error', id: again.id, code: 'unauthorized', message: 'no' });
  await sleep(5);
  script.last.deliver({ type: 'error', id: script.last.of('subscribe')[2].id, code: 'unauthorized', message: 'no' });
  assert.deepEqual(errors, ['unauthorized']);
  grid.close();
});

test('subscribes dropped by the rate limit are sent again; duplicates are not errors', async () => {
  const script = new Script();
  const errors = [];
  const grid = new LiveGrid('http://localhost:8080', options(script, { onError: (e) => errors.push(e.code) }));
  const a = grid.subscribe({ ns: 'app.a' });
  const b = grid.subscribe({ ns: 'app.b' });
  script.last.open();
  const [ida, idb] = script.last.of('subscribe').map((m) => m.id);
  script.last.deliver({ type: 'pong' });
  assert.equal(grid.state, 'connecting', 'not open before the results are in');
  script.last.deliver(result(ida, []));
  script.last.deliver({ type: 'error', code: 'rate_limited', message: 'slow down' });
  await sleep(30);
  assert.deepEqual(script.last.of('subscribe').slice(2).map((m) => m.id), [idb], 'only the unanswered one');
  script.last.deliver(result(idb, [{ _id: 1 }]));
  script.last.deliver({ type: 'error', id: idb, code: 'duplicate_subscription', message: 'in use' });
  assert.equal(grid.state, 'open');
  assert.equal(b.result.length, 1);
  assert.equal(b.error, null);
  assert.equal(a.ready, true);
  assert.deepEqual(errors, ['rate_limited']);
  grid.close();
});

test('a throwing handler neither breaks the result nor repeats deltas', async () => {
  const script = new Script();
  const grid = new LiveGrid('http://localhost:8080', options(script));
  const seen = [];
  const q = grid.subscribe({ ns: 'app.items' }, {
    onDelta: (d) => {
      seen.push(d.seq);
      throw new Error('a bug in the application');
    },
  });
  const thrown = [];
  const report = console.error;
  console.error = (e) => thrown.push(e.message);
  script.last.open();
  const id = script.last.of('subscribe')[0].id;
  script.last.deliver(result(id, []));
  script.last.deliver(add(id, 2, 1));
  script.last.deliver(add(id, 3, 2));
  console.error = report;
  assert.deepEqual(seen, [2, 3]);
  assert.deepEqual(q.result.map((d) => d._id), [1, 2]);
  assert.equal(thrown.length, 2, 'reported, not swallowed');
  grid.close();
});
