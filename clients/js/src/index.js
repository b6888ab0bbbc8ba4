// livegrid-client: live MongoDB queries from a livegrid server, kept correct through
// reconnects. No runtime dependencies; works in browsers and in Node 20+ (pass a WebSocket
// implementation where there is no global one).

export { LiveGrid, LiveQuery, backoffDelay, socketUrl } from './client.js';
export { LiveResult, ApplyError, idKey } from './live-result.js';
export { CacheSketch, fnv1a64, sketchBits } from './sketch.js';
