/*
 * JSON-RPC request bookkeeping: ids, their promises and their deadlines, plus the reconnect backoff.
 * Pure (timers are injected), so tests/js/pending.test.mjs drives it with a fake clock.
 */

import { LocalError } from "./protocol.js";

export class RpcError extends Error {
  constructor(code, message, data) {
    super(message);
    this.name = "RpcError";
    this.code = code;
    this.data = data;
  }
}

/** Outstanding calls by id; every call ends exactly once: answered, timed out, or failed with the socket. */
export class PendingCalls {
  constructor(timers = { set: (fn, ms) => setTimeout(fn, ms), clear: (h) => clearTimeout(h) }) {
    this.timers = timers;
    this.nextId = 1;
    this.calls = new Map();
  }

  get size() {
    return this.calls.size;
  }

  /** Register a call; returns its id and a promise that settles with the answer or an RpcError. */
  add(method, timeoutMs) {
    const id = this.nextId++;
    const promise = new Promise((resolve, reject) => {
      const timer = this.timers.set(() => {
        if (!this.calls.delete(id)) return;
        reject(new RpcError(LocalError.TIMEOUT, `${method}: no answer within ${Math.round(timeoutMs / 1000)} s`));
      }, timeoutMs);
      this.calls.set(id, { method, resolve, reject, timer });
    });
    return { id, promise };
  }

  /** Settle the call a response names; false when the id is unknown (late, or never ours). */
  answer(message) {
    if (message === null || typeof message !== "object" || !this.calls.has(message.id)) return false;
    const call = this.calls.get(message.id);
    this.calls.delete(message.id);
    this.timers.clear(call.timer);
    const error = message.error;
    if (error && typeof error === "object") call.reject(new RpcError(error.code, String(error.message || "error"), error.data));
    else call.resolve(message.result);
    return true;
  }

  /** Reject every outstanding call (the socket is gone: none of them will be answered). */
  failAll(message) {
    const calls = Array.from(this.calls.values());
    this.calls.clear();
    for (const call of calls) {
      this.timers.clear(call.timer);
      call.reject(new RpcError(LocalError.NOT_CONNECTED, message));
    }
  }
}

/** Jittered exponential backoff: attempt 0 waits min/2..min, doubling up to max/2..max. */
export function backoffDelay(attempt, random = Math.random, minMs = 250, maxMs = 8000) {
  const base = Math.min(maxMs, minMs * 2 ** Math.max(0, attempt));
  return base / 2 + random() * base / 2;
}
