// A client's copy of one live result: applies `result` and `delta` messages in order and checks
// the protocol's promises while doing so (each `seq` one more than the last, every index in
// range, every document where a delta says it is). A port of the Rust reference
// (protocol/src/live_result.rs); both are tested against the same recorded fixtures
// (clients/js/test/fixtures), so they cannot drift.

/** A protocol promise a message broke: the copy can no longer be trusted. */
export class ApplyError extends Error {
  /**
   * @param {string} kind `no_result`, `seq`, `mismatch` or `not_live`
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = 'ApplyError';
    this.kind = kind;
  }
}

/**
 * A canonical text for a relaxed Extended JSON value, so that two ids compare equal exactly
 * when they are the same value (object keys keep their order, as the server sends them).
 * @param {unknown} value
 */
export function idKey(value) {
  return JSON.stringify(value);
}

export class LiveResult {
  constructor() {
    /** @type {object[]} */
    this.docs = [];
    this.seq = 0;
    this.started = false;
    /** @type {number|string} */
    this.position = 0;
    this.partial = false;
  }

  /** Whether the documents are a state the data was in (not between a transaction's deltas). */
  get whole() {
    return !this.partial;
  }

  /**
   * Applies one `result` or `delta` message; throws {@link ApplyError} when it breaks a promise
   * (the copy is then unchanged by that message only if the error came before any change).
   * @param {any} message
   */
  apply(message) {
    if (message.type === 'result') {
      // A fresh result replaces everything (a re-sync).
      this.started = true;
      this.seq = message.seq;
      this.position = message.position;
      this.docs = message.docs.slice();
      this.partial = false;
      return;
    }
    if (message.type !== 'delta') {
      throw new ApplyError('not_live', 'not a result or delta message');
    }
    if (!this.started) {
      throw new ApplyError('no_result', 'delta before the initial result');
    }
    if (message.seq !== this.seq + 1) {
      throw new ApplyError('seq', `seq ${message.seq} after ${this.seq}`);
    }
    this.#applyDelta(message);
    this.seq = message.seq;
    this.partial = message.more === true;
  }

  #applyDelta(delta) {
    const docs = this.docs;
    const id = idKey(delta.docId);
    const mismatch = (reason) =>
      new ApplyError('mismatch', `${delta.op} of ${id} does not fit the result: ${reason}`);
    const doc = () => {
      if (delta.doc === undefined || delta.doc === null) throw mismatch('no document');
      return delta.doc;
    };
    const same = (d) => d !== undefined && idKey(d._id) === id;
    const located = (at) => {
      if (at < docs.length && same(docs[at])) return at;
      if (at < docs.length) throw mismatch(`another document is at ${at}`);
      throw mismatch(`index ${at} is past the end (${docs.length})`);
    };
    const find = () => docs.findIndex(same);
    const has = (v) => v !== undefined && v !== null;
    for (const field of ['index', 'oldIndex']) {
      const v = delta[field];
      if (has(v) && !(Number.isInteger(v) && v >= 0)) throw mismatch(`${field} ${JSON.stringify(v)} is not a position`);
    }
    switch (delta.op) {
      case 'add': {
        const added = doc();
        if (find() !== -1) throw mismatch('already present');
        if (has(delta.index)) {
          if (delta.index > docs.length) throw mismatch(`index ${delta.index} is past the end (${docs.length})`);
          docs.splice(delta.index, 0, added);
        } else {
          docs.push(added);
        }
        break;
      }
      case 'remove': {
        let at;
        if (has(delta.oldIndex)) at = located(delta.oldIndex);
        else if ((at = find()) === -1) throw mismatch('not present');
        docs.splice(at, 1);
        break;
      }
      case 'change': {
        const index = has(delta.index) ? delta.index : delta.oldIndex;
        let at;
        if (has(index)) at = located(index);
        else if ((at = find()) === -1) throw mismatch('not present');
        docs[at] = doc();
        break;
      }
      case 'changeIndex': {
        if (!has(delta.oldIndex)) throw mismatch('no oldIndex');
        const from = located(delta.oldIndex);
        if (!has(delta.index)) throw mismatch('no index');
        const moved = doc();
        docs.splice(from, 1);
        if (delta.index > docs.length) throw mismatch(`index ${delta.index} is past the end (${docs.length})`);
        docs.splice(delta.index, 0, moved);
        break;
      }
      default:
        throw mismatch(`unknown op ${delta.op}`);
    }
  }
}
