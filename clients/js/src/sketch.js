// The cache sketch (`GET /v1/cache-sketch`): an expiring Bloom filter of the URLs that may be
// stale in some cache. A client revalidates the URLs it holds and takes every other URL from
// its cache. The hash scheme is the one the main README documents ("The cache sketch").

const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;
const MASK64 = (1n << 64n) - 1n;

/**
 * 64-bit FNV-1a of a string's UTF-8 bytes.
 * @param {string} text
 * @returns {bigint}
 */
export function fnv1a64(text) {
  let h = FNV_OFFSET;
  for (const byte of new TextEncoder().encode(text)) {
    h ^= BigInt(byte);
    h = (h * FNV_PRIME) & MASK64;
  }
  return h;
}

/**
 * The bits a URL sets in a filter of `m` bits and `k` hashes.
 * @param {string} url
 * @param {number} m
 * @param {number} k
 * @returns {number[]}
 */
export function sketchBits(url, m, k) {
  const h = fnv1a64(url);
  const h1 = Number(h & 0xffffffffn);
  const h2 = Number(h >> 32n);
  const bits = [];
  for (let i = 0; i < k; i++) bits.push((h1 + i * h2) % m);
  return bits;
}

function decodeBase64(text) {
  if (typeof atob === 'function') {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }
  return new Uint8Array(Buffer.from(text, 'base64'));
}

export class CacheSketch {
  /**
   * @param {{m: number, k: number, b: string, entries: number, hash: string, position: number|string}} answer
   *   the JSON of `GET /v1/cache-sketch`
   */
  constructor(answer) {
    if (answer.hash !== 'fnv1a64-double') {
      throw new Error(`unknown cache sketch hash scheme ${JSON.stringify(answer.hash)}`);
    }
    this.m = answer.m;
    this.k = answer.k;
    this.entries = answer.entries;
    this.position = answer.position;
    this.bytes = decodeBase64(answer.b);
    this.fetchedAt = Date.now();
  }

  /**
   * Fetches the sketch from a livegrid server.
   * @param {string} base the server's HTTP origin, e.g. `https://api.example.com`
   * @param {{fetch?: typeof fetch, headers?: Record<string, string>}} [options]
   */
  static async fetch(base, options = {}) {
    const fetchImpl = options.fetch ?? globalThis.fetch;
    const response = await fetchImpl(new URL('/v1/cache-sketch', base).toString(), {
      headers: options.headers,
      cache: 'no-store',
    });
    if (!response.ok) throw new Error(`cache sketch: HTTP ${response.status}`);
    return new CacheSketch(await response.json());
  }

  /**
   * Whether a cached copy of `url` (its path and query, as requested) may be stale and must be
   * revalidated. False means a cached copy is current (as of when the sketch was fetched).
   * @param {string} url
   */
  mustRevalidate(url) {
    const target = url.startsWith('/') ? url : (() => {
      const u = new URL(url);
      return u.pathname + u.search;
    })();
    return sketchBits(target, this.m, this.k).every((bit) => (this.bytes[bit >> 3] >> (bit & 7)) & 1);
  }
}
