/*
 * Rich text for untrusted agent output: Markdown for replies (marked), ANSI colours for tool output
 * (ansi_up), and every piece of generated HTML through DOMPurify before it touches the DOM.  The three
 * libraries are vendored by `make browser-deps`; when any is missing the page shows plain text (escape
 * sequences removed) and says so nowhere louder than a tooltip: it is a degraded mode, not an error.
 */

const VENDOR = new URL("../vendor/", import.meta.url);
// CSI / OSC / other two-character escape sequences: what plain-text mode removes from tool output.
const ANSI_PATTERN = /\u001b(?:\[[0-?]*[ -/]*[@-~]|\][^\u0007\u001b]*(?:\u0007|\u001b\\)|[@-Z\\-_])/g;
// Agents may emit links; only these schemes stay clickable (DOMPurify also refuses javascript: and data:).
const SAFE_URL = /^(?:https?:|mailto:|#)/i;

let libs = null;
let loading = null;

/** Load the vendored libraries once; resolves to true when rich rendering is available. */
export function loadRich() {
  if (!loading) {
    loading = Promise.all([
      import(new URL("marked.esm.js", VENDOR).href),
      import(new URL("purify.es.js", VENDOR).href),
      import(new URL("ansi_up.js", VENDOR).href),
    ]).then(([markedModule, purifyModule, ansiModule]) => {
      const purify = purifyModule.default;
      purify.addHook("afterSanitizeAttributes", (node) => {
        if (node.tagName === "A") {
          const href = node.getAttribute("href") || "";
          if (!SAFE_URL.test(href)) node.removeAttribute("href");
          node.setAttribute("rel", "noopener noreferrer nofollow");
          node.setAttribute("target", "_blank");
        }
      });
      const marked = new markedModule.Marked({ gfm: true, breaks: false, async: false });
      libs = { marked, purify, AnsiUp: ansiModule.AnsiUp };
      return true;
    }).catch(() => {
      libs = null;
      return false;
    });
  }
  return loading;
}

export function richAvailable() {
  return libs !== null;
}

export function stripAnsi(text) {
  return text.replace(ANSI_PATTERN, "");
}

/** Sanitised HTML of a Markdown reply, or null in plain-text mode. */
export function markdownHtml(text) {
  if (!libs) return null;
  const html = libs.marked.parse(text);
  return libs.purify.sanitize(html, { USE_PROFILES: { html: true }, FORBID_TAGS: ["style", "form", "input", "button"] }).trim();
}

/**
 * A stateful ANSI-to-HTML converter for one stream of tool output (colours carry across chunks, and an
 * escape sequence split between chunks is completed by the next one).  Null in plain-text mode.
 */
export function ansiConverter() {
  if (!libs) return null;
  const converter = new libs.AnsiUp();
  converter.use_classes = false;
  converter.escape_html = true;
  const purify = libs.purify;
  return (text) => purify.sanitize(converter.ansi_to_html(text), { ALLOWED_TAGS: ["span", "a"], ALLOWED_ATTR: ["style", "href"] });
}
