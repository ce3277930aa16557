// node --test: the create form's fields become session.create params, or a clear message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { buildCreateParams, parseOptions, OptionsError, isModuleReference } from "../../gateway/static/js/options.js";

test("empty fields give empty params", () => {
  assert.deepEqual(buildCreateParams({}), {});
  assert.deepEqual(buildCreateParams({ agent: " ", optionsText: "  " }), {});
});

test("agent, title, cwd and JSON options pass through", () => {
  assert.deepEqual(buildCreateParams({ agent: "shell", title: " t ", cwd: "/tmp ", optionsText: '{"a": 1}' }),
    { agent: "shell", title: "t", cwd: "/tmp", options: { a: 1 } });
});

test("model and system fields merge into the options and win over the JSON", () => {
  assert.deepEqual(buildCreateParams({ agent: "openai", optionsText: '{"model": "x", "temperature": 0}', model: "m1",
    system: "Be brief." }), { agent: "openai", options: { model: "m1", temperature: 0, system: "Be brief." } });
});

test("bad JSON and non-objects are refused with a message naming the field", () => {
  for (const [text, pattern] of [["{", /not valid JSON/], ["[1]", /an array/], ["null", /not null/], ['"s"', /not string/],
    ["3", /not number/]]) {
    assert.throws(() => parseOptions(text), (err) => err instanceof OptionsError && err.field === "options-input"
      && pattern.test(err.message), text);
  }
});

test("module:attr references are told from built-in names", () => {
  assert.equal(isModuleReference("tests.agents_for_tests:SlowAgent"), true);
  assert.equal(isModuleReference("pkg.mod:factory"), true);
  assert.equal(isModuleReference("echo"), false);
  assert.equal(isModuleReference("a:b:c"), false);
});
