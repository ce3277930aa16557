// node --test: a slash result renders once whether it comes as an event, a response, or both in any order.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SlashLedger, SlashAction } from "../../gateway/static/js/slash.js";

test("a gateway without slash.result events: the response renders", () => {
  const l = new SlashLedger();
  const token = l.begin("s1", "/help");
  assert.equal(l.onResponse(token), SlashAction.RENDER_LOCAL);
});

test("event before the response: the response renders nothing", () => {
  const l = new SlashLedger();
  const token = l.begin("s1", "/status");
  assert.equal(l.onEvent("s1", "/status"), null);
  assert.equal(l.onResponse(token), SlashAction.SKIP);
});

test("response before the event: the event replaces the local copy", () => {
  const l = new SlashLedger();
  const token = l.begin("s1", "/status");
  assert.equal(l.onResponse(token), SlashAction.RENDER_LOCAL);
  l.rendered(token, "local-box");
  assert.equal(l.onEvent("s1", "/status"), "local-box");
  // From then on the gateway is known to emit events: responses never render.
  assert.equal(l.onResponse(l.begin("s1", "/help")), SlashAction.SKIP);
});

test("events of other sessions or commands do not match", () => {
  const l = new SlashLedger();
  const token = l.begin("s1", "/help");
  l.rendered(token, "box");
  assert.equal(l.onEvent("s2", "/help"), null);
  assert.equal(l.onEvent("s1", "/status"), null);
  assert.equal(l.onEvent("s1", "/help"), "box");
  assert.equal(l.onEvent("s1", "/help"), null, "a replayed event has nothing left to replace");
});
