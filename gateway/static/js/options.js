/*
 * The create form's fields -> `session.create` params, with a clear message for each mistake a person can
 * make (bad JSON, JSON that is not an object).  Pure, tested by tests/js/options.test.mjs.
 */

export class OptionsError extends Error {
  constructor(field, message) {
    super(message);
    this.name = "OptionsError";
    this.field = field; // the id of the form control to focus
  }
}

/** A `module:attr` agent reference (an importable factory), as opposed to a built-in agent's name. */
export function isModuleReference(agent) {
  return /^[A-Za-z_][\w.]*:[A-Za-z_]\w*$/.test(agent);
}

/** Parse the options textarea: empty means none; otherwise a JSON object. */
export function parseOptions(text) {
  const trimmed = (text || "").trim();
  if (!trimmed) return null;
  let value;
  try {
    value = JSON.parse(trimmed);
  } catch (err) {
    throw new OptionsError("options-input", `Agent options are not valid JSON: ${err.message}. ` +
      'Write an object, e.g. {"temperature": 0.2}.');
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new OptionsError("options-input", 'Agent options must be a JSON object, e.g. {"temperature": 0.2}, ' +
      `not ${value === null ? "null" : Array.isArray(value) ? "an array" : typeof value}.`);
  }
  return value;
}

/**
 * Build the params of session.create.  `model` and `system` (the openai agent's fields) are merged into the
 * options; a field that is filled in wins over the same key in the JSON.
 */
export function buildCreateParams({ agent = "", title = "", cwd = "", optionsText = "", model = "", system = "" } = {}) {
  const params = {};
  if (agent.trim()) params.agent = agent.trim();
  if (title.trim()) params.title = title.trim();
  if (cwd.trim()) params.cwd = cwd.trim();
  const options = parseOptions(optionsText) || {};
  if (model.trim()) options.model = model.trim();
  if (system.trim()) options.system = system;
  if (Object.keys(options).length) params.options = options;
  return params;
}
