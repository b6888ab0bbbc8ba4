// Brute-force live-query matching, the way Meteor- and Parse-style servers do it: every
// change is tested against every subscription of its collection, before and after the write,
// with a MongoDB-query library (sift or mingo). Reads the files `livegrid workload` writes
// (the same ones `livegrid replay` reads) and prints a one-line JSON summary.
//
// Usage: node match.mjs --events FILE --queries FILE --engine sift|mingo [--max-seconds S]
//
// Queries are registered once the events before their `after` are applied; only the events
// after that are timed. A subscription is notified when the document matches before or after
// the write (enter, change, leave). Sorted windows are matched by filter only (the peers keep
// no windows): the peer does less work than livegrid per event, never more.

import { readFileSync } from 'node:fs';
import { Query } from 'mingo';
import sift from 'sift';

function args() {
  const out = { maxSeconds: 60 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--events') out.events = value;
    else if (flag === '--queries') out.queries = value;
    else if (flag === '--engine') out.engine = value;
    else if (flag === '--max-seconds') out.maxSeconds = Number(value);
    else throw new Error(`unknown flag ${flag}`);
  }
  if (!out.events || !out.queries || !['sift', 'mingo'].includes(out.engine)) {
    throw new Error('usage: node match.mjs --events FILE --queries FILE --engine sift|mingo [--max-seconds S]');
  }
  return out;
}

/** Relaxed Extended JSON to plain values (the workloads use numbers, strings, arrays). */
function plain(value) {
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === 'object') {
    if ('$numberLong' in value) return Number(value.$numberLong);
    if ('$numberDouble' in value) return Number(value.$numberDouble);
    if ('$numberInt' in value) return Number(value.$numberInt);
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

function compile(engine, filter) {
  if (engine === 'sift') return sift(filter);
  const query = new Query(filter);
  return (doc) => query.test(doc);
}

const options = args();
const queries = readFileSync(options.queries, 'utf8')
  .split('\n')
  .filter((l) => l.trim())
  .map((l) => JSON.parse(l));
const after = Math.max(0, ...queries.map((q) => q.after ?? 0));
const byNamespace = new Map();
for (const q of queries) {
  const list = byNamespace.get(q.ns) ?? [];
  list.push(compile(options.engine, plain(q.filter)));
  byNamespace.set(q.ns, list);
}
const lines = readFileSync(options.events, 'utf8').split('\n').filter((l) => l.trim());
const state = new Map();
let notifications = 0;
let timed = 0;
let started = 0;
const deadline = () => performance.now() - started > options.maxSeconds * 1000;
for (let i = 0; i < lines.length; i++) {
  if (i === after) started = performance.now();
  const event = JSON.parse(lines[i]);
  const ns = typeof event.ns === 'string' ? event.ns : `${event.ns.db}.${event.ns.coll}`;
  const docs = state.get(ns) ?? new Map();
  state.set(ns, docs);
  const id = JSON.stringify(event.documentKey._id);
  const before = docs.get(id);
  const afterImage = event.operationType === 'delete' ? undefined : plain(event.fullDocument);
  if (afterImage) docs.set(id, afterImage);
  else docs.delete(id);
  if (i < after) continue;
  for (const test of byNamespace.get(ns) ?? []) {
    if ((before && test(before)) || (afterImage && test(afterImage))) notifications++;
  }
  timed++;
  if (timed % 256 === 0 && deadline()) break;
}
const seconds = (performance.now() - started) / 1000;
console.log(
  JSON.stringify({
    engine: options.engine,
    queries: queries.length,
    events: timed,
    notifications,
    seconds: Math.round(seconds * 1000) / 1000,
    events_per_sec: Math.round(timed / seconds),
  }),
);
