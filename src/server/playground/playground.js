// The live-query playground: one page, served by `livegrid serve` at `/`, built on the
// JavaScript client (served at /client/). Pick a namespace and a query, watch the live result
// (added rows flash green, changed rows yellow), write documents, and follow the server's
// live figures (from /metrics).

import { LiveGrid, idKey } from '/client/index.js';

const $ = (id) => document.getElementById(id);
const tokenInput = $('token');
const grid = new LiveGrid(location.origin, { token: () => tokenInput.value.trim() || undefined });
grid.onState((state) => {
  $('state').textContent = state;
  $('state').dataset.state = state;
});

let current = null; // the LiveQuery shown
let shown = new Map(); // idKey -> JSON text of the row last rendered

function parseJson(text, what, fallback) {
  const trimmed = text.trim();
  if (trimmed === '') return fallback;
  try {
    return JSON.parse(trimmed);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
}

function display(value) {
  if (value === null || value === undefined) return '';
  if (typeof value !== 'object') return String(value);
  if ('$oid' in value) return value.$oid;
  if ('$date' in value) return typeof value.$date === 'string' ? value.$date : JSON.stringify(value.$date);
  if ('$numberLong' in value) return value.$numberLong;
  if ('$numberDecimal' in value) return value.$numberDecimal;
  return JSON.stringify(value);
}

function render(docs) {
  const columns = ['_id'];
  for (const doc of docs) {
    for (const key of Object.keys(doc)) {
      if (!columns.includes(key) && columns.length < 8) columns.push(key);
    }
  }
  $('head').innerHTML = '';
  const headRow = document.createElement('tr');
  for (const name of ['#', ...columns]) {
    const th = document.createElement('th');
    th.textContent = name;
    headRow.append(th);
  }
  $('head').append(headRow);
  const rows = document.createDocumentFragment();
  const next = new Map();
  docs.forEach((doc, index) => {
    const key = idKey(doc._id);
    const text = JSON.stringify(doc);
    const tr = document.createElement('tr');
    tr.dataset.id = display(doc._id);
    if (!shown.has(key)) tr.className = 'added';
    else if (shown.get(key) !== text) tr.className = 'changed';
    const cells = [index + 1, ...columns.map((c) => display(doc[c]))];
    cells.forEach((value, i) => {
      const td = document.createElement('td');
      if (i === 0) td.className = 'index';
      td.textContent = value;
      td.title = String(value);
      tr.append(td);
    });
    tr.addEventListener('click', () => {
      $('write-id').value = display(doc._id);
    });
    rows.append(tr);
    next.set(key, text);
  });
  shown = next;
  $('rows').replaceChildren(rows);
  $('empty').hidden = docs.length > 0;
  $('empty').textContent = current ? 'No documents match yet. Insert one.' : 'Subscribe to a query to see its live result here.';
  $('result-meta').textContent = current ? `${docs.length} document${docs.length === 1 ? '' : 's'}` : '';
}

function log(delta) {
  const li = document.createElement('li');
  const op = document.createElement('span');
  op.className = 'op';
  op.textContent = delta.op;
  li.append(op, ` ${display(delta.docId)} (${delta.cause}) at ${delta.position}`);
  $('log').prepend(li);
  while ($('log').children.length > 30) $('log').lastChild.remove();
}

$('query-form').addEventListener('submit', (event) => {
  event.preventDefault();
  $('query-error').textContent = '';
  let query;
  try {
    const pipeline = parseJson($('pipeline').value, 'the pipeline', undefined);
    if (pipeline !== undefined) {
      // A live aggregation: filter, sort, skip, limit and projection are its own stages.
      if (!Array.isArray(pipeline)) throw new Error('the pipeline is an array of stages');
      query = { ns: $('ns').value.trim(), pipeline };
    } else {
      query = { ns: $('ns').value.trim(), filter: parseJson($('filter').value, 'the filter', {}) };
      const sort = parseJson($('sort').value, 'the sort', undefined);
      if (sort !== undefined) query.sort = sort;
      const skip = Number($('skip').value || 0);
      if (skip > 0) query.skip = skip;
      const limit = Number($('limit').value || 0);
      if (limit > 0) query.limit = limit;
      const projection = parseJson($('projection').value, 'the projection', undefined);
      if (projection !== undefined) query.projection = projection;
    }
  } catch (e) {
    $('query-error').textContent = e.message;
    return;
  }
  current?.unsubscribe();
  shown = new Map();
  $('log').replaceChildren();
  current = grid.subscribe(query, {
    onDelta: (delta) => log(delta),
    onError: (error) => {
      $('query-error').textContent = `${error.code}: ${error.message}`;
    },
  });
  current.subscribe(render);
});

function collectionPath() {
  const [db, ...rest] = $('ns').value.trim().split('.');
  return `/v1/db/${encodeURIComponent(db)}/${encodeURIComponent(rest.join('.'))}`;
}

async function call(method, path, body) {
  const headers = { 'Content-Type': 'application/json' };
  const token = tokenInput.value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status} ${answer.code ?? ''}: ${answer.message ?? response.statusText}`);
  return answer;
}

async function write(action) {
  $('write-status').textContent = '';
  try {
    $('write-status').textContent = await action();
  } catch (e) {
    $('write-status').textContent = e.message;
  }
}

$('insert-form').addEventListener('submit', (event) => {
  event.preventDefault();
  write(async () => {
    const answer = await call('POST', collectionPath(), parseJson($('doc').value, 'the document', {}));
    return `inserted ${display(answer._id)} at position ${answer.position}`;
  });
});

$('seed').addEventListener('click', () => {
  const names = ['apple', 'pear', 'plum', 'fig', 'kiwi', 'lime', 'date', 'quince'];
  const writes = Array.from({ length: 5 }, () => ({
    insert: { name: names[Math.floor(Math.random() * names.length)], score: Math.floor(Math.random() * 100) },
  }));
  write(async () => {
    const answer = await call('POST', `${collectionPath()}/_bulk`, { writes });
    return `inserted ${answer.positions?.length ?? writes.length} documents`;
  });
});

function idPath() {
  const id = $('write-id').value.trim();
  if (id === '') throw new Error('give an _id (click a row to pick one)');
  return `${collectionPath()}/${encodeURIComponent(id)}`;
}

$('change-form').addEventListener('submit', (event) => {
  event.preventDefault();
  write(async () => {
    const answer = await call('PATCH', idPath(), parseJson($('update').value, 'the update', {}));
    return answer.modified === false ? 'nothing changed' : `updated at position ${answer.position}`;
  });
});

$('delete').addEventListener('click', () => {
  write(async () => {
    const answer = await call('DELETE', idPath());
    return `deleted at position ${answer.position}`;
  });
});

// Live figures: counters from /metrics, turned into rates.
let previous = null;
/** The sum of a metric's samples whose labels include `want` (e.g. `quantile="0.5"`). */
function metric(text, name, want = '') {
  let sum;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name) || line.startsWith('#')) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const labels = rest[0] === '{' ? rest.slice(1, rest.indexOf('}')) : '';
    if (want && !labels.split(',').includes(want)) continue;
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (!Number.isNaN(value)) sum = (sum ?? 0) + value;
  }
  return sum;
}
async function figures() {
  try {
    const text = await (await fetch('/metrics', { cache: 'no-store' })).text();
    const now = { at: performance.now(), events: metric(text, 'livegrid_events_in') ?? 0, deltas: metric(text, 'livegrid_deltas_out') ?? 0 };
    if (previous) {
      const seconds = (now.at - previous.at) / 1000;
      $('events-rate').textContent = Math.round((now.events - previous.events) / seconds).toLocaleString();
      $('deltas-rate').textContent = Math.round((now.deltas - previous.deltas) / seconds).toLocaleString();
    }
    previous = now;
    const p50 = metric(text, 'livegrid_event_to_delta_seconds', 'quantile="0.5"');
    const p99 = metric(text, 'livegrid_event_to_delta_seconds', 'quantile="0.99"');
    const ms = (s) => (s === undefined || Number.isNaN(s) ? '–' : (s * 1000).toFixed(1));
    $('latency').textContent = `${ms(p50)} / ${ms(p99)}`;
    $('subscriptions').textContent = String(metric(text, 'livegrid_subscriptions') ?? 0);
  } catch {
    // The server is away; the connection state says so.
  }
}
setInterval(figures, 1000);
figures();
render([]);

// For tests and the curious.
window.playground = { grid, get query() { return current; } };
