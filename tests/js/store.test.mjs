// node --test: the page state kept in localStorage, its budget, and a storage that is full or corrupt.
import { test } from "node:test";
import assert from "node:assert/strict";
import { storageKey, encodeState, decodeState, PageStore, chooseOrphan, tabKey } from "../../gateway/static/js/store.js";

const rec = (seq, text) => ({ type: "message.delta", seq, payload: { turn_id: "t1", text } });

test("one key per gateway: origin plus the page's directory", () => {
  assert.equal(storageKey("http://127.0.0.1:8765", "/"), "worker-gateway:http://127.0.0.1:8765/");
  assert.equal(storageKey("https://h", "/gw/"), "worker-gateway:https://h/gw/");
  assert.equal(storageKey("https://h", "/gw/index.html"), "worker-gateway:https://h/gw/");
  assert.notEqual(storageKey("http://127.0.0.1:1", "/"), storageKey("http://127.0.0.1:2", "/"));
});

test("a round trip keeps sessions, logs, terminals and the current session", () => {
  const state = { current: "s1", terminals: [{ id: "t9" }], closed: true, savedAt: 5,
    sessions: [{ id: "s1", lastSeq: 2, complete: true, chars: 5, log: [rec(1, "a"), rec(2, "b")] }] };
  const back = decodeState(encodeState(state));
  assert.deepEqual(back, { version: 1, current: "s1", terminals: [{ id: "t9" }], closed: true, savedAt: 5,
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

function memoryStorage(limit = Infinity) {
  const data = new Map();
  return {
    get length() { return data.size; },
    key: (i) => Array.from(data.keys())[i] ?? null,
    getItem: (k) => (data.has(k) ? data.get(k) : null),
    setItem: (k, v) => { if (v.length > limit) throw new Error("QuotaExceededError"); data.set(k, String(v)); },
    removeItem: (k) => { data.delete(k); },
    data,
  };
}

test("PageStore keeps less when the storage is over its quota, and never throws", () => {
  const storage = memoryStorage(600);
  const store = new PageStore(storage, "gw", "tab1", 4000);
  const log = Array.from({ length: 20 }, (_, i) => rec(i + 1, "z".repeat(40)));
  assert.equal(store.save({ sessions: [{ id: "s", lastSeq: 20, complete: true, chars: 800, log }] }), true);
  assert.deepEqual(store.load().sessions, [{ id: "s", lastSeq: 0, log: [] }]);
  store.clear();
  assert.deepEqual(store.load().sessions, []);
  const broken = new PageStore({ getItem() { throw new Error("denied"); }, setItem() { throw new Error("denied"); } }, "gw", "t");
  assert.deepEqual(broken.load().sessions, []);
  assert.equal(broken.save({ sessions: [] }), false);
});

test("a reload finds its own tab's entry; another open tab's entry is never taken", () => {
  const storage = memoryStorage();
  const a = new PageStore(storage, "gw", "A", undefined, () => 1000);
  const b = new PageStore(storage, "gw", "B", undefined, () => 2000);
  a.save({ sessions: [{ id: "sa", lastSeq: 0, complete: true, log: [] }] });
  b.save({ sessions: [{ id: "sb", lastSeq: 0, complete: true, log: [] }] });
  assert.deepEqual(a.load().sessions.map((s) => s.id), ["sa"]);
  const fresh = new PageStore(storage, "gw", "C", undefined, () => 3000);
  assert.deepEqual(fresh.load().sessions, [], "both tabs are open: a new tab starts empty");
});

test("a new tab adopts the newest closed tab's entry, once", () => {
  const storage = memoryStorage();
  new PageStore(storage, "gw", "old", undefined, () => 1000).save({ sessions: [{ id: "s-old", lastSeq: 0, log: [] }] }, true);
  new PageStore(storage, "gw", "new", undefined, () => 2000).save({ sessions: [{ id: "s-new", lastSeq: 0, log: [] }] }, true);
  new PageStore(storage, "other-gw", "x", undefined, () => 3000).save({ sessions: [{ id: "s-x", lastSeq: 0, log: [] }] }, true);
  const reopened = new PageStore(storage, "gw", "C", undefined, () => 4000);
  assert.deepEqual(reopened.load().sessions.map((s) => s.id), ["s-new"]);
  assert.equal(storage.getItem(tabKey("gw", "new")), null, "the adopted entry is now this tab's, not shared");
  const another = new PageStore(storage, "gw", "D", undefined, () => 4000);
  assert.deepEqual(another.load().sessions.map((s) => s.id), ["s-old"]);
});

test("chooseOrphan prunes entries past the TTL, open or closed", () => {
  const entries = [
    { key: "open-new", closed: false, savedAt: 95 },
    { key: "open-ancient", closed: false, savedAt: 1 },
    { key: "closed-ancient", closed: true, savedAt: 2 },
    { key: "closed-1", closed: true, savedAt: 90 },
    { key: "closed-2", closed: true, savedAt: 92 },
  ];
  assert.deepEqual(chooseOrphan(entries, 100, 50), { adopt: "closed-2", prune: ["open-ancient", "closed-ancient"] });
  assert.deepEqual(chooseOrphan([], 100, 50), { adopt: null, prune: [] });
});
