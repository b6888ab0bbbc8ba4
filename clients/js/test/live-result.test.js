// Delta application against the recorded fixtures that the Rust reference is tested against
// too (tests/client_fixtures.rs), so the two implementations cannot drift.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { LiveResult, ApplyError } from '../src/index.js';

const fixture = (name) => new URL(`./fixtures/${name}`, import.meta.url);
const lines = (name) =>
  readFileSync(fixture(name), 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l));

test('the recorded messages give the recorded final results', () => {
  const live = new Map();
  for (const message of lines('messages.jsonl')) {
    if (!live.has(message.id)) live.set(message.id, new LiveResult());
    live.get(message.id).apply(message);
  }
  const expected = JSON.parse(readFileSync(fixture('expected.json'), 'utf8'));
  assert.deepEqual(Object.keys(expected).sort(), [...live.keys()].sort());
  for (const [id, docs] of Object.entries(expected)) {
    assert.deepEqual(live.get(id).docs, docs, id);
    assert.ok(live.get(id).whole, id);
  }
});

test('broken sequences fail where and as the Rust reference fails', () => {
  const cases = JSON.parse(readFileSync(fixture('broken.json'), 'utf8'));
  assert.ok(cases.length >= 4);
  for (const { name, messages, error, at } of cases) {
    const live = new LiveResult();
    let failed = null;
    for (let i = 0; i < messages.length && failed === null; i++) {
      try {
        live.apply(messages[i]);
      } catch (e) {
        assert.ok(e instanceof ApplyError, name);
        failed = [i, e.kind];
      }
    }
    assert.deepEqual(failed, [at, error], name);
  }
});

test('between the deltas of a transaction the result is not whole', () => {
  const live = new LiveResult();
  live.apply({ type: 'result', id: 's', seq: 1, position: 1, docs: [] });
  live.apply({ type: 'delta', id: 's', seq: 2, op: 'add', docId: 1, doc: { _id: 1 }, position: '2.0', more: true, cause: 'insert' });
  assert.equal(live.whole, false);
  live.apply({ type: 'delta', id: 's', seq: 3, op: 'add', docId: 2, doc: { _id: 2 }, position: '2.1', cause: 'insert' });
  assert.equal(live.whole, true);
  assert.deepEqual(live.docs.map((d) => d._id), [1, 2]);
});

test('ids compare as values, ObjectIds included', () => {
  const live = new LiveResult();
  const oid = { $oid: '65f000000000000000000001' };
  live.apply({ type: 'result', id: 's', seq: 1, position: 1, docs: [{ _id: oid, n: 1 }] });
  live.apply({ type: 'delta', id: 's', seq: 2, op: 'change', docId: { $oid: oid.$oid }, doc: { _id: oid, n: 2 }, position: 2, cause: 'update' });
  assert.deepEqual(live.docs, [{ _id: oid, n: 2 }]);
  assert.throws(
    () => live.apply({ type: 'delta', id: 's', seq: 3, op: 'remove', docId: { $oid: '65f000000000000000000002' }, position: 3, cause: 'delete' }),
    (e) => e.kind === 'mismatch',
  );
});
