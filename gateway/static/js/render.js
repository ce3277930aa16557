/*
 * Rendering: one SessionView (a detached <div> unless selected) per session, fed from the session's log.
 * Rendering never freezes the page: text is queued and appended once per animation frame within a budget,
 * and each view keeps at most DOM_CAP_CHARS of text in the DOM ("Show all" lifts the cap).
 * Server text goes in through textContent, or as HTML only after DOMPurify (rich.js).
 */

import { EventType } from "./protocol.js";
import { ansiConverter, markdownHtml, richAvailable, stripAnsi } from "./rich.js";

export const DOM_CAP_CHARS = 256 * 1024;   // text kept in the DOM per session while capped
const FRAME_BUDGET_CHARS = 64 * 1024;      // text appended to the DOM per animation frame (layout cost)
const SEGMENT_CHARS = 8 * 1024;            // text per block-level segment (see SessionView.appendText)
const MARKDOWN_MAX_CHARS = 64 * 1024;      // a longer reply is shown as plain text (re-parsing costs)
const MAX_TURNS_IN_DOM = 200;
const LARGE_VIEW_CHARS = 64 * 1024;       // above this, off-screen segments skip layout (style.css .large)

export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// ---- frame scheduling ---------------------------------------------------------------------------------
const dirtyViews = new Set();
let frameRequested = false;
let frameHooks = { before: () => null, after: () => {} };

/** main.js tells the scheduler how to keep the transcript scrolled (before: measure, after: apply). */
export function setFrameHooks(hooks) {
  frameHooks = hooks;
}

export function allFlushed() {
  return dirtyViews.size === 0;
}

export function forget(view) {
  dirtyViews.delete(view);
}

function requestFlush(view) {
  dirtyViews.add(view);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(flushFrame);
  }
}

function flushFrame() {
  frameRequested = false;
  let budget = FRAME_BUDGET_CHARS;
  const measured = frameHooks.before();
  for (const view of Array.from(dirtyViews)) {
    budget -= view.flush(budget);
    if (!view.hasPending()) dirtyViews.delete(view);
    if (budget <= 0) break;
  }
  frameHooks.after(measured);
  if (dirtyViews.size) {
    frameRequested = true;
    requestAnimationFrame(flushFrame);
  }
}

// ---- time --------------------------------------------------------------------------------------------
function clock(ms) {
  const d = new Date(ms);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

export function duration(ms) {
  if (!(ms >= 0)) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

export class SessionView {
  constructor() {
    this.root = el("div", "session-view");
    this.turns = new Map();      // turn_id -> {el, last: {kind, el, box}, subagents, calls, done, startedAt}
    this.queue = [];             // [{target, text, turn}] waiting for a frame
    this.queuedChars = 0;
    this.markdownDirty = new Set(); // reply blocks whose Markdown must be rendered again
    this.nodes = [];             // FIFO of {node, len, turn, seg}: nodes in the DOM, oldest first
    this.domChars = 0;
    this.capped = true;
    this.hiddenChars = 0;        // text not in the DOM because of the cap
    this.large = false;          // see LARGE_VIEW_CHARS
  }

  hasPending() {
    return this.queue.length > 0 || this.markdownDirty.size > 0;
  }

  turn(turnId, promptText, at) {
    let t = this.turns.get(turnId);
    if (!t) {
      const node = el("article", "turn");
      node.dataset.turn = turnId;
      const head = el("div", "turn-head");
      const prompt = el("div", "turn-prompt", promptText === undefined ? `(turn ${turnId})` : promptText);
      const time = el("time", "turn-time", at ? clock(at) : "");
      if (at) time.dateTime = new Date(at).toISOString();
      head.append(prompt, time);
      node.append(head);
      t = { el: node, prompt, time, last: null, subagents: new Map(), calls: new Map(), done: false, id: turnId,
        startedAt: at || null };
      this.turns.set(turnId, t);
      this.root.append(node);
      this.dropOldTurns();
    } else if (promptText !== undefined) {
      t.prompt.textContent = promptText;
      if (at && !t.startedAt) {
        t.startedAt = at;
        t.time.textContent = clock(at);
      }
    }
    return t;
  }

  /** The block that text of `kind` goes to: consecutive text of one kind shares a block. */
  block(t, kind) {
    if (t.last && t.last.kind === kind && t.last.box.parentNode === t.el && !t.done) return t.last.el;
    let box;
    let node;
    if (kind === "tool") {
      // Tool output is collapsible; ANSI colours render when ansi_up is there.
      box = el("details", "tool-box");
      box.open = true;
      box.append(el("summary", "tool-summary", "tool output"));
      node = el("div", "tool");
      node.ansi = ansiConverter();
      box.append(node);
    } else if (kind === "reasoning") {
      box = el("details", "reasoning");
      box.append(el("summary", "reasoning-summary", "reasoning"));
      node = el("div", "reasoning-text");
      box.append(node);
    } else {
      node = el("div", "reply");
      box = node;
      if (richAvailable()) {
        node.classList.add("md");
        node.mdRaw = "";
      }
    }
    t.el.append(box);
    t.last = { kind, el: node, box };
    return node;
  }

  text(target, text, turn) {
    if (!text) return;
    if (target.mdRaw !== undefined) {
      target.mdRaw += text;
      this.markdownDirty.add(target);
      requestFlush(this);
      return;
    }
    if (!target.ansi) text = stripAnsi(text);
    if (!text) return;
    const last = this.queue[this.queue.length - 1];
    if (last && last.target === target) last.text += text;
    else this.queue.push({ target, text, turn });
    this.queuedChars += text.length;
    requestFlush(this);
  }

  line(cls, text, turn) {
    const node = el("div", cls, text);
    (turn ? turn.el : this.root).append(node);
    return node;
  }

  /** Render dirty Markdown, then append queued text within `budget` characters; returns what was used. */
  flush(budget) {
    let used = 0;
    for (const target of this.markdownDirty) {
      if (target.mdRaw.length > MARKDOWN_MAX_CHARS) {
        // Too long to re-parse on every delta: from here on it is plain text.
        const raw = target.mdRaw;
        target.mdRaw = undefined;
        target.classList.remove("md");
        target.replaceChildren();
        this.markdownDirty.delete(target);
        this.text(target, raw, null);
        continue;
      }
      target.innerHTML = markdownHtml(target.mdRaw);
      used += target.mdRaw.length;
    }
    this.markdownDirty.clear();
    if (this.capped && this.queuedChars > DOM_CAP_CHARS) {
      // More is waiting than the DOM may hold: skip the oldest part rather than insert and trim it.
      let excess = this.queuedChars - DOM_CAP_CHARS;
      while (excess > 0 && this.queue.length) {
        const item = this.queue[0];
        const cut = Math.min(excess, item.text.length);
        item.text = item.text.slice(cut);
        if (!item.text) this.queue.shift();
        excess -= cut;
        this.queuedChars -= cut;
        this.hiddenChars += cut;
      }
    }
    while (this.queue.length && used < budget) {
      const item = this.queue[0];
      let text = item.text;
      if (text.length > budget - used && used > 0) break;
      if (text.length > budget) {
        item.text = text.slice(budget);
        text = text.slice(0, budget);
      } else {
        this.queue.shift();
      }
      this.appendText(item.target, text, item.turn);
      this.domChars += text.length;
      this.queuedChars -= text.length;
      used += text.length;
    }
    if (this.capped) this.trim();
    const large = !this.capped || this.domChars > LARGE_VIEW_CHARS;
    if (large !== this.large) {
      this.large = large;
      this.root.classList.toggle("large", large);
    }
    return used;
  }

  /**
   * Text goes into block-level segments of about SEGMENT_CHARS, cut only after a newline, so that the
   * browser lays out the last segment rather than the whole block on every frame, and so that trimming
   * drops whole segments.  ANSI output becomes sanitised <span>s, plain output text nodes.
   */
  appendText(target, text, turn) {
    let offset = 0;
    while (offset < text.length) {
      let seg = target.lastChild;
      if (!seg || !seg.classList || !seg.classList.contains("seg") || (seg.segLen >= SEGMENT_CHARS && seg.endsLine)) {
        seg = el("div", "seg");
        seg.segLen = 0;
        target.append(seg);
      }
      let end = text.length;
      const room = SEGMENT_CHARS - seg.segLen;
      if (end - offset > room) {
        const newline = text.indexOf("\n", Math.max(offset, offset + room - 1));
        if (newline !== -1) end = newline + 1;
      }
      const piece = offset === 0 && end === text.length ? text : text.slice(offset, end);
      let node;
      // Until a block's first escape sequence its text is plain: a text node, no converter, no sanitiser.
      if (target.ansi && !target.ansiSeen && piece.includes("\u001b")) target.ansiSeen = true;
      if (target.ansiSeen) {
        node = document.createElement("span");
        node.innerHTML = target.ansi(piece);
      } else {
        node = document.createTextNode(piece);
      }
      seg.append(node);
      seg.segLen += piece.length;
      seg.endsLine = piece.endsWith("\n");
      this.nodes.push({ node, len: piece.length, turn, seg });
      offset = end;
    }
  }

  trim() {
    let excess = this.domChars - DOM_CAP_CHARS;
    while (excess > 0 && this.nodes.length) {
      const first = this.nodes[0];
      if (first.len <= excess || first.node.nodeType !== Node.TEXT_NODE) {
        this.nodes.shift();
        first.node.remove();
        if (!first.seg.firstChild) first.seg.remove();
        this.domChars -= first.len;
        this.hiddenChars += first.len;
        excess -= first.len;
      } else {
        first.node.deleteData(0, excess);
        first.len -= excess;
        this.domChars -= excess;
        this.hiddenChars += excess;
        excess = 0;
      }
    }
  }

  dropOldTurns() {
    if (!this.capped || this.turns.size <= MAX_TURNS_IN_DOM) return;
    for (const [id, t] of this.turns) {
      if (this.turns.size <= MAX_TURNS_IN_DOM) break;
      if (!t.done) continue;
      t.el.remove();
      this.turns.delete(id);
      const kept = [];
      for (const n of this.nodes) {
        if (n.turn === t) { this.domChars -= n.len; this.hiddenChars += n.len; } else kept.push(n);
      }
      this.nodes = kept;
    }
  }
}

function describe(payload, skip) {
  return Object.keys(payload).filter((k) => !skip.includes(k))
    .map((k) => `${k}=${typeof payload[k] === "object" ? JSON.stringify(payload[k]) : payload[k]}`).join(" ");
}

function subagentBlock(view, t, subagentId, startPayload) {
  let sub = t.subagents.get(subagentId);
  if (!sub) {
    const details = el("details", "subagent");
    details.open = true;
    const summary = el("summary");
    const name = el("span", "subagent-name", `subagent ${subagentId}`);
    const state = el("span", "muted", "");
    summary.append(name, " ", state);
    const log = el("div", "subagent-log");
    details.append(summary, log);
    // Nested subagents: a start payload naming a known parent goes inside that parent.
    const parentId = startPayload && (startPayload.parent_subagent_id || startPayload.parent_id);
    const parent = parentId ? t.subagents.get(parentId) : null;
    (parent ? parent.details : t.el).append(details);
    let tool = null;
    sub = {
      details, log, name,
      setState: (s) => { state.textContent = `(${s})`; },
      toolBlock: () => {
        if (!tool || tool !== details.lastChild) {
          tool = el("div", "tool");
          tool.ansi = ansiConverter();
          details.append(tool);
        }
        return tool;
      },
    };
    t.subagents.set(subagentId, sub);
    t.last = null;
  }
  if (startPayload) {
    const label = [startPayload.name, startPayload.goal].filter(Boolean).join(": ");
    if (label) sub.name.textContent = `subagent ${label}`;
  }
  return sub;
}

/** One tool call (tool.call) and the output of that call (tool.output with its call_id). */
function toolCallBlock(view, t, callId, payload) {
  let call = t.calls.get(callId);
  if (!call) {
    const details = el("details", "tool-call");
    details.open = true;
    const summary = el("summary", "tool-call-summary");
    const name = el("span", "tool-call-name", "tool");
    summary.append("tool call ", name);
    const args = el("pre", "tool-call-args");
    const out = el("div", "tool");
    out.ansi = ansiConverter();
    details.append(summary, args, out);
    t.el.append(details);
    call = { details, name, args, out };
    t.calls.set(callId, call);
    t.last = null;
  }
  if (payload) {
    call.name.textContent = String(payload.name || "tool");
    let args = payload.arguments;
    if (typeof args === "string") {
      try { args = JSON.parse(args); } catch (e) { /* shown as sent */ }
    }
    call.args.textContent = typeof args === "string" ? args : JSON.stringify(args === undefined ? {} : args, null, 2);
  }
  return call;
}

function usageText(usage) {
  if (!usage || typeof usage !== "object") return "";
  const parts = [];
  const labels = [["prompt_tokens", "prompt"], ["completion_tokens", "completion"], ["total_tokens", "total"]];
  for (const [key, label] of labels) if (typeof usage[key] === "number") parts.push(`${label} ${usage[key]}`);
  for (const key of Object.keys(usage)) {
    if (!labels.some(([k]) => k === key) && typeof usage[key] !== "object") parts.push(`${key} ${usage[key]}`);
  }
  return parts.length ? `tokens: ${parts.join(", ")}` : "";
}

/** A slash command's result (from a slash.result event, or a slash.exec response): returns its box. */
function slashBox(view, command, ok, output) {
  const box = el("div", "slash" + (ok ? "" : " failed"));
  box.append(el("div", "slash-cmd", command));
  const out = el("div", "slash-output");
  box.append(out);
  view.root.append(box);
  view.text(out, output || (ok ? "(no output)" : "(failed)"), null);
  return box;
}

/** The box each rendered slash result got, so a late slash.result event can replace a local copy. */
export const slashBoxes = new WeakMap();

/** Render one logged record (an event's params, or a local record such as a slash command) into `view`. */
export function render(view, rec) {
  const p = rec.payload || {};
  switch (rec.type) {
    case EventType.TURN_START:
      view.turn(p.turn_id, p.text || "", rec.at);
      break;
    case EventType.MESSAGE_DELTA: {
      const t = view.turn(p.turn_id);
      if (p.subagent_id && t.subagents.has(p.subagent_id)) view.text(t.subagents.get(p.subagent_id).log, p.text, t);
      else view.text(view.block(t, "reply"), p.text, t);
      break;
    }
    case EventType.REASONING_DELTA: {
      const t = view.turn(p.turn_id);
      view.text(view.block(t, "reasoning"), p.text, t);
      break;
    }
    case EventType.TOOL_CALL: {
      const t = view.turn(p.turn_id);
      toolCallBlock(view, t, p.call_id, p);
      break;
    }
    case EventType.TOOL_OUTPUT: {
      const t = view.turn(p.turn_id);
      let target;
      if (p.subagent_id) target = subagentBlock(view, t, p.subagent_id, null).toolBlock();
      else if (p.call_id !== undefined && p.call_id !== null) target = toolCallBlock(view, t, p.call_id, null).out;
      else target = view.block(t, "tool");
      view.text(target, p.text, t);
      break;
    }
    case EventType.SUBAGENT_START: {
      const t = view.turn(p.turn_id);
      subagentBlock(view, t, p.subagent_id, p).setState("running");
      break;
    }
    case EventType.SUBAGENT_PROGRESS: {
      const t = view.turn(p.turn_id);
      const sub = subagentBlock(view, t, p.subagent_id, null);
      const text = typeof p.text === "string" ? p.text : describe(p, ["turn_id", "subagent_id"]);
      if (typeof p.progress === "number") sub.setState(`running, ${Math.round(p.progress * 100)}%`);
      view.text(sub.log, text.endsWith("\n") ? text : text + "\n", t);
      break;
    }
    case EventType.SUBAGENT_COMPLETE: {
      const t = view.turn(p.turn_id);
      const sub = subagentBlock(view, t, p.subagent_id, null);
      sub.setState(p.status || "complete");
      const rest = describe(p, ["turn_id", "subagent_id", "status"]);
      if (rest) view.text(sub.log, rest + "\n", t);
      break;
    }
    case EventType.TURN_COMPLETE: {
      const t = view.turn(p.turn_id);
      t.done = true;
      let text = `turn ${p.status || "complete"}`;
      if (p.exit_code !== undefined && p.exit_code !== null) text += `, exit code ${p.exit_code}`;
      if (p.error) text += `: ${p.error}`;
      if (rec.at && t.startedAt) text += ` · ${duration(rec.at - t.startedAt)}`;
      const end = view.line(`turn-end status-${p.status || "ok"}`, text, t);
      const usage = usageText(p.usage);
      if (usage) end.append(" · ", el("span", "turn-usage", usage));
      break;
    }
    case EventType.WORKER_EXITED:
      view.line("system-line", `worker ${p.pid} exited (return code ${p.returncode}` +
        (p.signal ? `, signal ${p.signal}` : "") + (p.expected ? "" : ", unexpectedly") + ")");
      break;
    case EventType.SESSION_DETACHED:
      view.line("system-line", `This page no longer receives this session's events (${p.reason || "detached"}).`);
      break;
    case EventType.SESSION_CLOSED:
      view.line("system-line", `Session closed (${p.reason || "closed"}).`);
      break;
    case EventType.REPLAY_TRUNCATED:
      view.line("system-line", `The gateway no longer holds the output before event ${p.first_seq}; it is missing here.`);
      break;
    case EventType.SLASH_RESULT:
      slashBoxes.set(rec, slashBox(view, String(p.command || ""), Boolean(p.ok), String(p.output || "")));
      break;
    case "local.slash":
      slashBoxes.set(rec, slashBox(view, rec.command, rec.ok, rec.output));
      break;
    case "local.note":
      view.line("system-line", rec.text);
      break;
    default:
      view.line("system-line", `${rec.type}: ${describe(p, [])}`);
  }
}
