// The cache sketch helper against the README's test vectors.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { CacheSketch, fnv1a64, sketchBits } from '../src/index.js';

const VECTORS = [
  ['a', 0xaf63dc4c8601ec8cn, [126092, 116952, 107812, 98672, 89532, 80392, 71252]],
  ['/v1/db/app/todos?filter=%7B%22done%22%3Afalse%7D', 0x4588b0600e6c020cn, [524, 45676, 90828, 135980, 181132, 226284, 9292]],
  ['/v1/db/app/todos/42', 0x70b0b7dbd807ea63n, [256611, 41534, 88601, 135668, 182735, 229802, 14725]],
];

test('hashes and bits follow the documented scheme', () => {
  for (const [url, hash, bits] of VECTORS) {
    assert.equal(fnv1a64(url), hash, url);
    assert.deepEqual(sketchBits(url, 262144, 7), bits, url);
  }
});

test('membership reads the bits least significant first', () => {
  const m = 262144;
  const bytes = new Uint8Array(m / 8);
  for (const bit of sketchBits('/v1/db/app/todos/42', m, 7)) bytes[bit >> 3] |= 1 << (bit & 7);
  const sketch = new CacheSketch({
    m, k: 7, b: Buffer.from(bytes).toString('base64'), entries: 1, hash: 'fnv1a64-double', position: 5,
  });
  assert.equal(sketch.mustRevalidate('/v1/db/app/todos/42'), true);
  assert.equal(sketch.mustRevalidate('http://localhost:8080/v1/db/app/todos/42'), true);
  assert.equal(sketch.mustRevalidate('/v1/db/app/todos/43'), false);
  assert.throws(() => new CacheSketch({ m, k: 7, b: '', entries: 0, hash: 'md5', position: 0 }));
});
