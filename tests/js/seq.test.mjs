// node --test: the seq bookkeeping the dashboard uses to drop replayed duplicates and count real gaps.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SeqTracker, SeqVerdict } from "../../gateway/static/js/seq.js";

test("consecutive events are new and advance lastSeq", () => {
  const t = new SeqTracker();
  assert.equal(t.accept(1, "turn.start"), SeqVerdict.NEW);
  assert.equal(t.accept(2, "message.delta"), SeqVerdict.NEW);
  assert.deepEqual(t.stats(), { lastSeq: 2, events: 2, duplicates: 0, gaps: 0 });
});

test("a replay that overlaps what was rendered is dropped as duplicates", () => {
  const t = new SeqTracker(5, 5);
  assert.equal(t.accept(4, "message.delta"), SeqVerdict.DUPLICATE);
  assert.equal(t.accept(5, "message.delta"), SeqVerdict.DUPLICATE);
  assert.equal(t.accept(6, "message.delta"), SeqVerdict.NEW);
  assert.deepEqual(t.stats(), { lastSeq: 6, events: 6, duplicates: 2, gaps: 0 });
});

test("an unannounced jump is a gap, counted once", () => {
  const t = new SeqTracker();
  t.accept(1, "turn.start");
  assert.equal(t.accept(4, "message.delta"), SeqVerdict.GAP);
  assert.equal(t.accept(5, "message.delta"), SeqVerdict.NEW);
  assert.equal(t.gaps, 1);
});

test("replay.truncated and a truncated resume announce the jump that follows", () => {
  const t = new SeqTracker(2, 2);
  assert.equal(t.accept(10, "replay.truncated"), SeqVerdict.NEW);
  assert.equal(t.accept(40, "message.delta"), SeqVerdict.NEW);
  assert.equal(t.accept(42, "message.delta"), SeqVerdict.GAP);
  const r = new SeqTracker(3, 3);
  r.announceGap();
  assert.equal(r.accept(100, "message.delta"), SeqVerdict.NEW);
  assert.equal(r.gaps, 0);
});

test("events without an integer seq are not counted", () => {
  const t = new SeqTracker();
  for (const seq of [null, undefined, "3", 2.5]) assert.equal(t.accept(seq, "gateway.ready"), SeqVerdict.UNSEQUENCED);
  assert.deepEqual(t.stats(), { lastSeq: 0, events: 0, duplicates: 0, gaps: 0 });
});
