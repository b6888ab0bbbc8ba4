// The playground in headless Chromium against a real `livegrid serve`: subscribe, insert
// through the form and through REST, see rows appear, change and leave in order; kill the
// server and start it again, and see the page resume with no wrong rows. Takes the
// screenshots README shows (clients/js/screenshots/). And the client in Node 20 (with the
// `ws` package for a WebSocket) through the same kind of run.
//
// Needs Debian's chromium (/usr/bin/chromium, or LIVEGRID_CHROMIUM) and the livegrid binary
// (LIVEGRID_BIN, default target/debug/livegrid). Run: npm run e2e.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';
import WebSocket from 'ws';

import { LiveGrid } from '../../src/index.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const root = join(here, '../../../..');
const BIN = process.env.LIVEGRID_BIN ?? join(root, 'target/debug/livegrid');
const CHROMIUM = process.env.LIVEGRID_CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = join(here, '../../screenshots');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function freePort() {
  return new Promise((resolve) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function startServer(port, data) {
  const child = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--data', data], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  for (let i = 0; i < 300; i++) {
    if (child.exitCode !== null) throw new Error(`livegrid serve exited: ${stderr}`);
    try {
      if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) return child;
    } catch {}
    await sleep(100);
  }
  child.kill('SIGKILL');
  throw new Error(`livegrid serve did not become healthy: ${stderr}`);
}

async function rest(port, method, path, body) {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  assert.ok(response.ok, `${method} ${path}: ${JSON.stringify(answer)}`);
  return answer;
}

/** The _ids of the rows on the page, in order. */
const rowIds = (page) => page.$$eval('#rows tr', (rows) => rows.map((r) => r.dataset.id));

/** Waits (bounded) until the page's rows are `ids`. */
async function expectRows(page, ids, what) {
  let got;
  for (let i = 0; i < 100; i++) {
    got = await rowIds(page);
    if (JSON.stringify(got) === JSON.stringify(ids)) return;
    await sleep(100);
  }
  assert.deepEqual(got, ids, what);
}

async function expectState(page, state) {
  await page.waitForFunction((s) => document.getElementById('state').textContent === s, state, { timeout: 30_000 });
}

test('the playground follows a live query through writes and a server restart', async () => {
  const data = mkdtempSync(join(tmpdir(), 'livegrid-e2e-'));
  const port = await freePort();
  let server = await startServer(port, data);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    const problems = [];
    page.on('pageerror', (e) => problems.push(e.message));
    await page.goto(`http://127.0.0.1:${port}/`);
    await expectState(page, 'open');

    // Every result the page shows is recorded: none may ever be out of order or too long.
    await page.fill('#ns', 'demo.items');
    await page.fill('#filter', '{}');
    await page.fill('#sort', '{"score": -1}');
    await page.fill('#limit', '3');
    await page.click('#subscribe');
    await page.waitForFunction(() => window.playground.query?.ready === true);
    await page.evaluate(() => {
      window.shown = [];
      window.playground.query.subscribe((docs) => window.shown.push(docs.map((d) => [d._id, d.score])));
    });

    // Through the form.
    await page.fill('#doc', '{"_id": 1, "name": "apple", "score": 10}');
    await page.click('#insert');
    await expectRows(page, ['1'], 'the inserted row appears');
    // Through REST: 2 and 3 enter above, 4 stays out of the top three.
    for (const [id, score] of [[2, 30], [3, 20], [4, 5]]) {
      await rest(port, 'POST', '/v1/db/demo/items', { _id: id, name: `item ${id}`, score });
    }
    await expectRows(page, ['2', '3', '1'], 'sorted by score, top three');
    // A change that moves a row, through REST; a delete through the form.
    await rest(port, 'PATCH', '/v1/db/demo/items/1', { $set: { score: 40 } });
    await expectRows(page, ['1', '2', '3'], 'the updated row moves up');
    await page.fill('#write-id', '2');
    await page.click('#delete');
    await expectRows(page, ['1', '3', '4'], 'a deleted row leaves and the next one slides in');
    // The server's live figures: the counters of /metrics turned into rates.
    await page.waitForFunction(
      () => /^\d/.test(document.getElementById('events-rate').textContent)
        && document.getElementById('subscriptions').textContent === '1'
        && /^\d/.test(document.getElementById('latency').textContent),
      null,
      { timeout: 10_000 },
    );
    await page.screenshot({ path: join(SHOTS, 'playground.png') });

    // Kill the server (no clean shutdown) and start it again on the same data.
    server.kill('SIGKILL');
    await new Promise((resolve) => server.once('exit', resolve));
    await expectState(page, 'offline');
    server = await startServer(port, data);
    await expectState(page, 'open');
    await rest(port, 'POST', '/v1/db/demo/items', { _id: 5, name: 'item 5', score: 50 });
    await rest(port, 'PATCH', '/v1/db/demo/items/3', { $set: { score: 1 } });
    await expectRows(page, ['5', '1', '4'], 'live again after the restart');
    const truth = await rest(port, 'GET', `/v1/db/demo/items?sort=${encodeURIComponent('{"score":-1}')}&limit=3`);
    assert.deepEqual(truth.docs.map((d) => String(d._id)), ['5', '1', '4']);

    // No wrong rows at any time: every result shown was sorted, at most three, no duplicates.
    const shown = await page.evaluate(() => window.shown);
    assert.ok(shown.length >= 8, `${shown.length} results shown`);
    for (const rows of shown) {
      assert.ok(rows.length <= 3, JSON.stringify(rows));
      assert.equal(new Set(rows.map(([id]) => id)).size, rows.length, JSON.stringify(rows));
      for (let i = 1; i < rows.length; i++) assert.ok(rows[i - 1][1] >= rows[i][1], JSON.stringify(rows));
    }
    assert.deepEqual(problems, [], 'no errors in the page');

    // A live aggregation from the form: documents per name, most first; a write moves it.
    await page.click('#pipeline-details summary');
    await page.fill(
      '#pipeline',
      '[{"$group": {"_id": "$name", "n": {"$count": {}}}}, {"$sort": {"n": -1, "_id": 1}}, {"$limit": 2}]',
    );
    await page.click('#subscribe');
    await expectRows(page, ['apple', 'item 3'], 'one row per group, in the pipeline\'s order');
    for (const id of [6, 7]) await rest(port, 'POST', '/v1/db/demo/items', { _id: id, name: 'item 5', score: 1 });
    await expectRows(page, ['item 5', 'apple'], 'a group grows to the top; the last is pushed out');
    const groups = await rest(port, 'POST', '/v1/db/demo/items/_aggregate', {
      pipeline: [{ $group: { _id: '$name', n: { $count: {} } } }, { $sort: { n: -1, _id: 1 } }, { $limit: 2 }],
    });
    assert.deepEqual(groups.docs, [{ _id: 'item 5', n: 3 }, { _id: 'apple', n: 1 }]);
    await page.fill('#pipeline', '');
    assert.deepEqual(problems, [], 'no errors in the page');

    // A phone-sized screen: nothing wider than the screen.
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
    await phone.goto(`http://127.0.0.1:${port}/`);
    await expectState(phone, 'open');
    await phone.click('#subscribe');
    await expectRows(phone, ['5', '1', '4', '3', '6', '7'], 'the phone page shows the result (limit 10)');
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
    await phone.screenshot({ path: join(SHOTS, 'playground-phone.png') });
  } finally {
    await browser.close();
    server.kill('SIGKILL');
    rmSync(data, { recursive: true, force: true });
  }
});

test('in Node with a WebSocket implementation, through writes and a restart', async () => {
  const data = mkdtempSync(join(tmpdir(), 'livegrid-e2e-node-'));
  const port = await freePort();
  let server = await startServer(port, data);
  const states = [];
  const grid = new LiveGrid(`http://127.0.0.1:${port}`, { WebSocket, onState: (s) => states.push(s), backoff: { initialMs: 100, maxMs: 1000 } });
  try {
    const q = grid.subscribe({ ns: 'node.items', filter: { kind: 'a' }, sort: { n: 1 }, limit: 2 });
    const until = async (check, what) => {
      for (let i = 0; i < 200 && !check(); i++) await sleep(50);
      assert.ok(check(), what);
    };
    const ids = () => q.result.map((d) => d._id);
    await until(() => q.ready, 'a result');
    for (const [id, kind, n] of [[1, 'a', 5], [2, 'b', 1], [3, 'a', 3], [4, 'a', 9]]) {
      await rest(port, 'POST', '/v1/db/node/items', { _id: id, kind, n });
    }
    await until(() => JSON.stringify(ids()) === '[3,1]', `top two of kind a: ${ids()}`);
    server.kill('SIGKILL');
    await new Promise((resolve) => server.once('exit', resolve));
    await until(() => grid.state === 'offline' || grid.state === 'connecting', 'the loss is seen');
    server = await startServer(port, data);
    await until(() => grid.state === 'open', `open again: ${states}`);
    await rest(port, 'PATCH', '/v1/db/node/items/4', { $set: { n: 0 } });
    await until(() => JSON.stringify(ids()) === '[4,3]', `after the restart: ${ids()}`);
    assert.deepEqual(states.slice(0, 2), ['open', 'offline']);
  } finally {
    grid.close();
    server.kill('SIGKILL');
    rmSync(data, { recursive: true, force: true });
  }
});

mkdirSync(SHOTS, { recursive: true });
