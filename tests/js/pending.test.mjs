// node --test: JSON-RPC ids, answers, deadlines (with a fake clock) and the reconnect backoff.
import { test } from "node:test";
import assert from "node:assert/strict";
import { PendingCalls, RpcError, backoffDelay } from "../../gateway/static/js/pending.js";
import { ErrorCode, LocalError } from "../../gateway/static/js/protocol.js";

function fakeTimers() {
  const timers = new Map();
  let next = 1;
  let now = 0;
  return {
    set: (fn, ms) => { const h = next++; timers.set(h, { fn, at: now + ms }); return h; },
    clear: (h) => { timers.delete(h); },
    advance(ms) {
      now += ms;
      for (const [h, t] of Array.from(timers)) if (t.at <= now) { timers.delete(h); t.fn(); }
    },
    get count() { return timers.size; },
  };
}

test("ids are distinct and a result resolves its own call", async () => {
  const clock = fakeTimers();
  const calls = new PendingCalls(clock);
  const a = calls.add("gateway.ping", 1000);
  const b = calls.add("gateway.info", 1000);
  assert.notEqual(a.id, b.id);
  assert.equal(calls.answer({ id: b.id, result: { version: "x" } }), true);
  assert.deepEqual(await b.promise, { version: "x" });
  assert.equal(calls.size, 1);
  assert.equal(clock.count, 1, "the answered call's deadline is cleared");
});

test("an error response rejects with its code and data", async () => {
  const calls = new PendingCalls(fakeTimers());
  const a = calls.add("terminal.list", 1000);
  calls.answer({ id: a.id, error: { code: ErrorCode.METHOD_NOT_FOUND, message: "no such method", data: { m: 1 } } });
  await assert.rejects(a.promise, (err) => err instanceof RpcError && err.code === -32601 && err.data.m === 1);
});

test("unknown or late ids are ignored", async () => {
  const clock = fakeTimers();
  const calls = new PendingCalls(clock);
  const a = calls.add("gateway.ping", 100);
  assert.equal(calls.answer({ id: 999, result: {} }), false);
  assert.equal(calls.answer(null), false);
  clock.advance(100);
  await assert.rejects(a.promise, (err) => err.code === LocalError.TIMEOUT && /no answer/.test(err.message));
  assert.equal(calls.answer({ id: a.id, result: {} }), false, "an answer after the deadline is late");
  assert.equal(calls.size, 0);
});

test("failAll rejects every call once and clears their deadlines", async () => {
  const clock = fakeTimers();
  const calls = new PendingCalls(clock);
  const list = [calls.add("a", 100), calls.add("b", 100)];
  calls.failAll("lost");
  for (const c of list) await assert.rejects(c.promise, (err) => err.code === LocalError.NOT_CONNECTED);
  assert.equal(clock.count, 0);
  clock.advance(1000); // nothing fires twice
});

test("backoff doubles from 250 ms to 8 s with jitter in the upper half", () => {
  assert.equal(backoffDelay(0, () => 0), 125);
  assert.equal(backoffDelay(0, () => 1), 250);
  assert.equal(backoffDelay(3, () => 1), 2000);
  assert.equal(backoffDelay(20, () => 1), 8000);
  assert.equal(backoffDelay(20, () => 0), 4000);
});
