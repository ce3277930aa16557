// node --test: the page state kept in localStorage, its budget, and a storage that is full or corrupt.
import { test } from "node:test";
import assert from "node:assert/strict";
import { storageKey, encodeState, decodeState, PageStore } from "../../gateway/static/js/store.js";

const rec = (seq, text) => ({ type: "message.delta", seq, payload: { turn_id: "t1", text } });

test("one key per gateway: origin plus the page's directory", () => {
  assert.equal(storageKey("http://127.0.0.1:8765", "/"), "worker-gateway:http://127.0.0.1:8765/");
  assert.equal(storageKey("https://h", "/gw/"), "worker-gateway:https://h/gw/");
  assert.equal(storageKey("https://h", "/gw/index.html"), "worker-gateway:https://h/gw/");
  assert.notEqual(storageKey("http://127.0.0.1:1", "/"), storageKey("http://127.0.0.1:2", "/"));
});

test("a round trip keeps sessions, logs, terminals and the current session", () => {
  const state = { current: "s1", terminals: [{ id: "t9" }],
    sessions: [{ id: "s1", lastSeq: 2, complete: true, chars: 5, log: [rec(1, "a"), rec(2, "b")] }] };
  const back = decodeState(encodeState(state));
  assert.deepEqual(back, { version: 1, current: "s1", terminals: [{ id: "t9" }],
    sessions: [{ id: "s1", lastSeq: 2, log: [rec(1, "a"), rec(2, "b")] }] });
});

test("an incomplete log is not kept: the session resumes from seq 0", () => {
  const state = { sessions: [{ id: "s1", lastSeq: 9, complete: false, log: [rec(9, "x")] }] };
  assert.deepEqual(decodeState(encodeState(state)).sessions, [{ id: "s1", lastSeq: 0, log: [] }]);
});

test("over the budget the largest logs go first, the ids stay", () => {
  const big = Array.from({ length: 50 }, (_, i) => rec(i + 1, "x".repeat(100)));
  const small = [rec(1, "y")];
  const state = { sessions: [{ id: "big", lastSeq: 50, complete: true, chars: 5000, log: big },
    { id: "small", lastSeq: 1, complete: true, chars: 1, log: small }] };
  const text = encodeState(state, 2000);
  assert.ok(text.length <= 2000, text.length);
  const back = decodeState(text);
  assert.deepEqual(back.sessions.map((s) => [s.id, s.lastSeq, s.log.length]), [["big", 0, 0], ["small", 1, 1]]);
});

test("corrupt, foreign or missing data decodes to an empty state", () => {
  for (const text of [null, "", "{", "[]", '{"version": 99}', '{"version": 1, "sessions": [1, {"id": 3}]}']) {
    const state = decodeState(text);
    assert.deepEqual(state.sessions, [], String(text));
    assert.deepEqual(state.terminals, []);
  }
});

test("PageStore keeps less when the storage is over its quota, and never throws", () => {
  const data = new Map();
  const storage = {
    getItem: (k) => (data.has(k) ? data.get(k) : null),
    setItem: (k, v) => { if (v.length > 600) throw new Error("QuotaExceededError"); data.set(k, v); },
    removeItem: (k) => data.delete(k),
  };
  const store = new PageStore(storage, "k", 4000);
  const log = Array.from({ length: 20 }, (_, i) => rec(i + 1, "z".repeat(40)));
  assert.equal(store.save({ sessions: [{ id: "s", lastSeq: 20, complete: true, chars: 800, log }] }), true);
  assert.deepEqual(store.load().sessions, [{ id: "s", lastSeq: 0, log: [] }]);
  store.clear();
  assert.deepEqual(store.load().sessions, []);
  const broken = new PageStore({ getItem() { throw new Error("denied"); }, setItem() { throw new Error("denied"); } }, "k");
  assert.deepEqual(broken.load().sessions, []);
  assert.equal(broken.save({ sessions: [] }), false);
});
