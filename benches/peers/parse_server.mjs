// Parse Server with LiveQuery on PostgreSQL, the real peer of livegrid's end-to-end benchmark
// (scripts/e2e_bench.py starts it; benches/e2e.rs drives it). Parse Server and its LiveQuery
// server share one Node process and one port, the way Parse documents a single-server setup:
// REST writes at /parse, LiveQuery WebSockets on the same port. Writes are acknowledged once
// PostgreSQL has committed them (its defaults: fsync and synchronous_commit on).
//
// Usage: node parse_server.mjs --port P --database postgres://... [--classes N] [--logs DIR]
// LiveQuery is enabled for the classes Run0 .. Run<N-1> (one per benchmark run). Prints
// "ready" on stdout once it listens.

import { ParseServer } from 'parse-server';

const args = { classes: 32 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const [flag, value] = [argv[i], argv[i + 1]];
  if (flag === '--port') args.port = Number(value);
  else if (flag === '--database') args.database = value;
  else if (flag === '--classes') args.classes = Number(value);
  else if (flag === '--logs') args.logs = value;
  else throw new Error(`unknown flag ${flag}`);
}
if (!args.port || !args.database) {
  throw new Error('usage: node parse_server.mjs --port P --database postgres://... [--classes N]');
}

const classNames = Array.from({ length: args.classes }, (_, i) => `Run${i}`);
await ParseServer.startApp({
  databaseURI: args.database,
  appId: 'bench',
  masterKey: 'bench-master-key',
  serverURL: `http://127.0.0.1:${args.port}/parse`,
  host: '127.0.0.1',
  port: args.port,
  mountPath: '/parse',
  startLiveQueryServer: true,
  liveQuery: { classNames },
  logLevel: 'error',
  logsFolder: args.logs ?? './logs',
  verifyServerUrl: false,
});
console.log('ready');
