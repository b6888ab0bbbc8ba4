// Types for livegrid-client.

export type Document = Record<string, unknown>;
export type Position = number | string;
export type ConnectionState = 'connecting' | 'open' | 'resuming' | 'offline' | 'closed';

export interface Query {
  ns: string;
  filter?: Document;
  sort?: Document;
  skip?: number;
  limit?: number;
  projection?: Document;
  /** An aggregation pipeline instead of filter/sort/skip/limit/projection: the result is its
   *  output, one document per group, kept live. */
  pipeline?: Document[];
}

export interface ServerError {
  type: 'error';
  id?: string;
  code: string;
  message: string;
}

export interface Delta {
  type: 'delta';
  id: string;
  seq: number;
  op: 'add' | 'remove' | 'change' | 'changeIndex';
  docId: unknown;
  doc?: Document;
  index?: number;
  oldIndex?: number;
  cause: 'insert' | 'update' | 'replace' | 'delete' | 'none';
  position: Position;
  more?: boolean;
}

export interface ResultMessage {
  type: 'result';
  id: string;
  seq: number;
  position: Position;
  token?: string;
  docs: Document[];
}

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
  jitter?: number;
}

export interface LiveGridOptions {
  /** A token, or a function giving a fresh one (asked at each connection and when one expires). */
  token?: string | (() => string | undefined | Promise<string | undefined>);
  WebSocket?: unknown;
  backoff?: BackoffOptions;
  heartbeatMs?: number;
  stableMs?: number;
  onState?: (state: ConnectionState) => void;
  onError?: (error: ServerError) => void;
  random?: () => number;
}

export interface Handlers {
  onResult?: (docs: Document[]) => void;
  onDelta?: (delta: Delta, docs: Document[]) => void;
  onError?: (error: ServerError) => void;
}

export class LiveGrid {
  constructor(url: string, options?: LiveGridOptions);
  readonly url: string;
  readonly state: ConnectionState;
  onState(listener: (state: ConnectionState) => void): () => void;
  subscribe(query: Query, handlers?: Handlers): LiveQuery;
  close(): void;
}

export class LiveQuery {
  readonly query: Query;
  /** The current result, in order; a new array at every change. */
  readonly result: Document[];
  readonly ready: boolean;
  readonly error: ServerError | null;
  readonly resyncs: number;
  unsubscribe(): void;
  /** Calls `run` now and after every change; returns a function that stops it. */
  subscribe(run: (result: Document[]) => void): () => void;
  getSnapshot(): Document[];
}

export class ApplyError extends Error {
  constructor(kind: 'no_result' | 'seq' | 'mismatch' | 'not_live', message: string);
  readonly kind: 'no_result' | 'seq' | 'mismatch' | 'not_live';
}

export class LiveResult {
  docs: Document[];
  seq: number;
  started: boolean;
  position: Position;
  partial: boolean;
  readonly whole: boolean;
  apply(message: ResultMessage | Delta): void;
}

export function idKey(value: unknown): string;
export function backoffDelay(
  attempt: number,
  backoff: Required<BackoffOptions>,
  random?: () => number,
): number;
export function socketUrl(url: string): string;

export interface SketchAnswer {
  m: number;
  k: number;
  b: string;
  entries: number;
  hash: 'fnv1a64-double';
  position: Position;
}

export class CacheSketch {
  constructor(answer: SketchAnswer);
  static fetch(
    base: string,
    options?: { fetch?: typeof fetch; headers?: Record<string, string> },
  ): Promise<CacheSketch>;
  readonly m: number;
  readonly k: number;
  readonly entries: number;
  readonly position: Position;
  mustRevalidate(url: string): boolean;
}

export function fnv1a64(text: string): bigint;
export function sketchBits(url: string, m: number, k: number): number[];
