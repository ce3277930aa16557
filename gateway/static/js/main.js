/*
 * worker-gateway dashboard: the page's state and controls.  The contract is docs/protocol.md; the modules:
 *   protocol.js  the wire vocabulary (mirrors gateway/wire.py)    transport.js  the /ws JSON-RPC socket
 *   pending.js   request ids and deadlines, backoff (pure)        seq.js        seq/gap bookkeeping (pure)
 *   store.js     what the page had open, in localStorage (pure)   slash.js      slash results shown once (pure)
 *   options.js   the create form -> session.create (pure)         render.js     transcript rendering
 *   rich.js      Markdown / ANSI through DOMPurify (or plain)      terminal.js   xterm.js terminals
 * What this file adds on top of the protocol: sessions and terminals survive a reload (resumed from the last
 * seq rendered), and `window.wgDebug`, a small test hook used by tests/e2e/test_browser.py.
 */

import { ErrorCode, EventType, LocalError, Method } from "./protocol.js";
import { RpcError } from "./pending.js";
import { SeqTracker, SeqVerdict } from "./seq.js";
import { PageStore, storageKey } from "./store.js";
import { SlashAction, SlashLedger } from "./slash.js";
import { OptionsError, buildCreateParams, isModuleReference } from "./options.js";
import { Connection, ConnState } from "./transport.js";
import { SessionView, allFlushed, el, forget, render, setFrameHooks, slashBoxes } from "./render.js";
import { loadRich, richAvailable } from "./rich.js";
import { TerminalView, loadXterm, xtermInstalled } from "./terminal.js";

// The server set the HttpOnly cookie on this response: the token must not stay in history or bookmarks.
const here = new URL(window.location.href);
if (here.searchParams.has("token")) {
  here.searchParams.delete("token");
  window.history.replaceState(null, "", here.pathname + here.search + here.hash);
}

const LOG_CAP_CHARS = 32 * 1024 * 1024; // text kept in memory per session (what "Show all" can show)
const LIST_REFRESH_MS = 5000;
const PERSIST_DELAY_MS = 400;
const LIST_CHANGING_EVENTS = new Set([EventType.TURN_START, EventType.TURN_COMPLETE, EventType.SESSION_DETACHED,
  EventType.SESSION_CLOSED]);

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------------------
// Application state
// ---------------------------------------------------------------------------------------------------------
const app = {
  sessions: new Map(), // session_id -> session record (below)
  current: null,
  epoch: null,
  agents: [],
  defaultAgent: null,
  terminals: new Map(), // terminal_id -> TerminalView
  activeTerminal: null,
  termAvailable: false,
  terminalListSupported: null, // null: not asked yet
  restoredTerminals: [],
  otherTerminals: [], // from terminal.list: terminals nobody is attached to that this page does not show
};
const slashLedger = new SlashLedger();
const gatewayKey = storageKey(window.location.origin, window.location.pathname);
const store = new PageStore(safeStorage("localStorage"), gatewayKey, tabId());

function safeStorage(name) {
  try { return window[name]; } catch (e) { return null; } // disabled storage: nothing is remembered
}

/** This tab's id: sessionStorage keeps it across reloads (and a reopened tab), not across tabs. */
function tabId() {
  const tabs = safeStorage("sessionStorage");
  const key = `${gatewayKey}#tab-id`;
  try {
    let id = tabs.getItem(key);
    if (!id) {
      id = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
      tabs.setItem(key, id);
    }
    return id;
  } catch (e) {
    return "default";
  }
}

function sessionRecord(id, info) {
  let s = app.sessions.get(id);
  if (!s) {
    s = {
      id, agent: "", title: "", status: "", attached: false, createdAt: null,
      seq: new SeqTracker(), owned: false, closed: false, running: null,
      log: [], logChars: 0, logDropped: false, complete: true,
      view: new SessionView(),
    };
    app.sessions.set(id, s);
  }
  if (info) {
    if (info.agent !== undefined) s.agent = info.agent;
    if (info.title !== undefined && info.title !== null) s.title = info.title;
    if (info.status !== undefined) s.status = info.status;
    if (info.attached !== undefined) s.attached = info.attached;
    if (info.created_at !== undefined) s.createdAt = info.created_at;
  }
  return s;
}

function record(s, rec) {
  const len = rec.payload && typeof rec.payload.text === "string" ? rec.payload.text.length
    : (rec.output ? rec.output.length : (rec.payload && typeof rec.payload.output === "string" ? rec.payload.output.length : 0));
  s.log.push({ rec, len });
  s.logChars += len;
  while (s.logChars > LOG_CAP_CHARS && s.log.length > 1) {
    s.logChars -= s.log.shift().len;
    s.logDropped = true;
  }
  render(s.view, rec);
  schedulePersist();
}

/** Session state that follows from an event (live, or restored from storage on load). */
function applyEvent(s, params, live) {
  const p = params.payload || {};
  switch (params.type) {
    case EventType.TURN_START: s.running = p.turn_id; s.status = "running"; break;
    case EventType.TURN_COMPLETE:
      if (s.running === p.turn_id) s.running = null;
      s.status = "idle";
      if (live && s.id === app.current) announce(`Turn ${p.status || "complete"}.`);
      break;
    case EventType.SESSION_DETACHED:
      if (!live) break;
      s.owned = false;
      if (s.id === app.current) showNotice("Another window resumed this session; select it again to take it back.");
      break;
    case EventType.SESSION_CLOSED:
      s.owned = false;
      s.closed = true;
      s.running = null;
      if (live) scheduleListRefresh();
      break;
    case EventType.REPLAY_TRUNCATED:
      s.complete = false; // the log no longer starts at seq 1: a reload must ask the gateway again
      break;
    case EventType.SLASH_RESULT: {
      const local = slashLedger.onEvent(s.id, String(p.command || ""));
      if (local) unrecord(s, local);
      break;
    }
    default: break;
  }
}

/** Remove a locally rendered record that the event stream now carries. */
function unrecord(s, rec) {
  const index = s.log.findIndex((entry) => entry.rec === rec);
  if (index >= 0) {
    s.logChars -= s.log[index].len;
    s.log.splice(index, 1);
  }
  const box = slashBoxes.get(rec);
  if (box) box.remove();
}

function onEvent(params) {
  const id = params.session_id;
  if (!id) return;
  const s = sessionRecord(id);
  if (s.seq.accept(params.seq, params.type) === SeqVerdict.DUPLICATE) return;
  params.at = Date.now(); // arrival time: turns show their time and duration (kept across reloads)
  applyEvent(s, params, true);
  record(s, params);
  if (LIST_CHANGING_EVENTS.has(params.type)) renderList();
  if (id === app.current) updateControls();
}

async function onReady(payload) {
  if (app.epoch && payload.epoch && payload.epoch !== app.epoch) {
    // A new server run: the sessions of the previous one are gone.
    for (const s of app.sessions.values()) {
      if (!s.closed) record(s, { type: "local.note", payload: {}, text: "The gateway restarted; this session ended with it." });
      s.closed = true;
      s.owned = false;
      s.running = null;
    }
  }
  app.epoch = payload.epoch || app.epoch;
  $("server-version").textContent = payload.version ? `v${payload.version}` : "";
  try {
    const info = await conn.call(Method.INFO);
    if (info.limits && info.limits.max_message_bytes) conn.maxMessageBytes = info.limits.max_message_bytes;
    fillAgents(info.agents || [], info.default_agent);
  } catch (err) {
    showNotice(`gateway.info failed: ${err.message}`);
  }
  // Resume only what is still live: with the session store, session.resume would also reopen a session
  // that was closed meanwhile (elsewhere, or by the gateway), which is the user's call, not the page's.
  let live = null;
  try {
    live = new Set((await conn.call(Method.SESSION_ACTIVE_LIST)).sessions.map((x) => x.session_id));
  } catch (err) {
    live = null;
  }
  const remembered = Array.from(app.sessions.values()).filter((s) => s.owned && !s.closed);
  for (const s of remembered) {
    if (live && !live.has(s.id)) forgetClosed(s);
  }
  await Promise.all(remembered.filter((s) => !s.closed).map(resume));
  await refreshList();
  updateControls();
  for (const view of app.terminals.values()) view.reconnect();
  const ids = app.restoredTerminals;
  app.restoredTerminals = [];
  await restoreTerminals(ids);
  schedulePersist();
}

function forgetClosed(s) {
  s.owned = false;
  s.closed = true;
  s.running = null;
  record(s, { type: "local.note", payload: {}, text: "This session no longer exists on the gateway." });
  schedulePersist();
}

async function resume(s) {
  const wasOwned = s.owned; // true on gateway.ready (the page's own sessions); false for a click on another
  try {
    const result = await conn.call(Method.SESSION_RESUME, { session_id: s.id, after_seq: s.seq.lastSeq });
    s.owned = true;
    s.status = result.status || s.status;
    if (result.truncated) {
      s.seq.announceGap();
      s.complete = false;
    }
    return true;
  } catch (err) {
    // The socket went while the call was out: a session that was ours stays ours, and the next
    // gateway.ready resumes it from the same seq (dropping it here lost a running turn after two quick
    // drops). A click on a session that was not ours says why nothing happened, as before.
    if (err.code === LocalError.NOT_CONNECTED && wasOwned) return false;
    s.owned = false;
    if (err.code === ErrorCode.NOT_FOUND) {
      forgetClosed(s);
    } else if (s.id === app.current) {
      showNotice(`Could not resume the session: ${err.message}`);
    }
    return false;
  } finally {
    schedulePersist();
  }
}

const conn = new Connection({
  onReady: (payload) => { onReady(payload); },
  onEvent,
  onState: (state, detail) => {
    const box = $("conn-status");
    box.className = `conn conn-${state}`;
    $("conn-text").textContent = detail ? `${state}: ${detail}` : state;
    box.dataset.state = state;
    updateControls();
  },
}, new URL("main.js", import.meta.url).href);

// ---------------------------------------------------------------------------------------------------------
// Remembering what the page had open (localStorage, per gateway)
// ---------------------------------------------------------------------------------------------------------
let persistTimer = null;

function schedulePersist() {
  if (persistTimer === null) persistTimer = setTimeout(persistNow, PERSIST_DELAY_MS);
}

function persistable(rec) {
  const out = { type: rec.type, payload: rec.payload || {} };
  for (const key of ["seq", "at", "command", "ok", "output"]) if (rec[key] !== undefined) out[key] = rec[key];
  return out;
}

function persistNow(closing = false) {
  clearTimeout(persistTimer);
  persistTimer = null;
  const sessions = [];
  for (const s of app.sessions.values()) {
    if (!s.owned || s.closed) continue;
    const complete = s.complete && !s.logDropped;
    sessions.push({
      id: s.id, lastSeq: s.seq.lastSeq, complete, chars: s.logChars,
      log: complete ? s.log.filter((e) => e.rec.type !== "local.note").map((e) => persistable(e.rec)) : [],
    });
  }
  const terminals = Array.from(app.terminals.values()).filter((v) => !v.ended && v.id).map((v) => ({ id: v.id }));
  // Terminals remembered from before a reload that are not reattached yet stay remembered.
  for (const id of app.restoredTerminals) if (!terminals.some((t) => t.id === id)) terminals.push({ id });
  store.save({ current: app.current, sessions, terminals }, closing === true);
}

/** Render what the page had before a reload; the sessions are resumed from there once connected. */
function restore() {
  const saved = store.load();
  for (const entry of saved.sessions) {
    const s = sessionRecord(entry.id);
    s.owned = true; // ours before the reload: resumed on gateway.ready
    let events = 0;
    for (const rec of entry.log) {
      if (typeof rec.seq === "number") events += 1;
      applyEvent(s, rec, false);
      record(s, rec);
    }
    s.seq = new SeqTracker(entry.lastSeq, entry.lastSeq ? events : 0);
  }
  app.restoredTerminals = saved.terminals.map((t) => t.id);
  if (saved.current && app.sessions.has(saved.current)) select(saved.current);
  renderList();
}

// ---------------------------------------------------------------------------------------------------------
// Controls
// ---------------------------------------------------------------------------------------------------------
function fillAgents(agents, defaultAgent) {
  const select = $("agent-select");
  const previous = select.value;
  const names = agents.slice();
  // A `module:attr` default is not among the built-in names: show it too, so it can be picked back.
  if (defaultAgent && !names.includes(defaultAgent)) names.unshift(defaultAgent);
  app.agents = names;
  app.defaultAgent = defaultAgent;
  select.replaceChildren(...names.map((name) => {
    const option = el("option", null, name);
    option.value = name;
    if (isModuleReference(name)) option.title = "an agent factory given as module:attr";
    return option;
  }));
  select.value = names.includes(previous) ? previous : (defaultAgent || names[0] || "");
  $("agent-default").textContent = defaultAgent ? `Default: ${defaultAgent}` : "";
  updateControls();
}

function showNotice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

function announce(text) {
  $("turn-status").textContent = text;
}

function updateControls() {
  const online = conn.state === ConnState.CONNECTED;
  const s = app.current ? app.sessions.get(app.current) : null;
  const usable = online && s && !s.closed;
  $("agent-select").disabled = !online || !app.agents.length;
  $("create-button").disabled = !online || !app.agents.length;
  $("prompt-input").disabled = !s || s.closed;
  $("send-button").disabled = !usable;
  $("slash-input").disabled = !s || s.closed;
  $("slash-button").disabled = !usable;
  $("interrupt-button").disabled = !usable || !s.running;
  $("term-open-button").disabled = !online || !app.termAvailable;
  $("term-close-button").disabled = !app.activeTerminal;
  if (s) {
    const title = s.title || s.id;
    $("chat-title").textContent = `${title} · ${s.agent}${s.closed ? " · closed" : s.running ? " · running" : ""}`;
    updateShowAll(s);
  } else {
    $("chat-title").textContent = "No session selected";
  }
}

function updateShowAll(s) {
  const button = $("show-all-button");
  const v = s.view;
  if (!v.capped) {
    button.hidden = false;
    button.textContent = "Show recent only";
  } else if (v.hiddenChars > 0 || s.logDropped) {
    button.hidden = false;
    button.textContent = `Show all (${Math.ceil(v.hiddenChars / 1024)} KB hidden)`;
  } else {
    button.hidden = true;
  }
}

function select(id) {
  const s = app.sessions.get(id);
  if (!s) return;
  app.current = id;
  showNotice("");
  $("transcript").replaceChildren(s.view.root);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  renderList();
  updateControls();
  schedulePersist();
}

async function pick(id) {
  const s = sessionRecord(id);
  select(id);
  if (!s.owned && !s.closed) {
    const ok = await resume(s);
    if (ok) announce(`Resumed ${s.title || s.id}.`);
    renderList();
    updateControls();
  }
}

function setOptionsError(text) {
  const box = $("options-error");
  box.textContent = text;
  box.hidden = !text;
  $("options-input").setAttribute("aria-invalid", text ? "true" : "false");
}

async function createSession(event) {
  event.preventDefault();
  let params;
  try {
    params = buildCreateParams({
      agent: $("agent-ref-input").value || $("agent-select").value,
      title: $("title-input").value,
      cwd: $("cwd-input").value,
      optionsText: $("options-input").value,
      model: $("model-input").value,
      system: $("system-input").value,
    });
    setOptionsError("");
  } catch (err) {
    if (!(err instanceof OptionsError)) throw err;
    $("create-more").open = true;
    setOptionsError(err.message);
    $(err.field).focus();
    return;
  }
  $("create-button").disabled = true;
  try {
    const result = await conn.call(Method.SESSION_CREATE, params);
    const s = sessionRecord(result.session_id, { agent: result.agent, title: params.title || "",
      created_at: result.created_at, status: "idle", attached: true });
    s.owned = true;
    $("title-input").value = "";
    select(s.id);
    await refreshList();
    $("prompt-input").focus();
  } catch (err) {
    showNotice(`Could not create a session: ${err.message}`);
  } finally {
    updateControls();
  }
}

async function closeSession(id) {
  const s = app.sessions.get(id);
  try {
    await conn.call(Method.SESSION_CLOSE, { session_id: id });
    if (s) { s.closed = true; s.owned = false; s.running = null; }
  } catch (err) {
    showNotice(`Could not close the session: ${err.message}`);
  }
  schedulePersist();
  await refreshList();
  updateControls();
}

async function submitPrompt(event) {
  event.preventDefault();
  const input = $("prompt-input");
  const text = input.value;
  const s = app.current ? app.sessions.get(app.current) : null;
  if (!s || !text.trim()) return;
  if (text.trimStart().startsWith("/")) {
    // "/help" typed in the prompt box is a slash command, not a prompt for the agent.
    input.value = "";
    await runSlashCommand(s, text.trim());
    return;
  }
  try {
    const result = await conn.call(Method.PROMPT_SUBMIT, { session_id: s.id, text });
    input.value = "";
    showNotice("");
    if (result.status === "queued") announce("Prompt queued behind the running turn.");
  } catch (err) {
    showNotice(`Could not send the prompt: ${err.message}`);
  }
}

async function runSlash(event) {
  event.preventDefault();
  const input = $("slash-input");
  let command = input.value.trim();
  const s = app.current ? app.sessions.get(app.current) : null;
  if (!s || !command) return;
  if (!command.startsWith("/")) command = "/" + command;
  input.value = "";
  await runSlashCommand(s, command);
}

/** slash.exec; the result renders from the `slash.result` event, or from the response on older gateways. */
async function runSlashCommand(s, command) {
  const token = slashLedger.begin(s.id, command);
  try {
    const result = await conn.call(Method.SLASH_EXEC, { session_id: s.id, command });
    showNotice("");
    if (slashLedger.onResponse(token) === SlashAction.RENDER_LOCAL) {
      const rec = { type: "local.slash", payload: {}, command, ok: Boolean(result.ok), output: String(result.output || ""),
        at: Date.now() };
      record(s, rec);
      slashLedger.rendered(token, rec);
    }
    announce(result.ok ? `${command} done.` : `${command} failed.`);
  } catch (err) {
    const code = err instanceof RpcError ? err.code : LocalError.NOT_CONNECTED;
    record(s, { type: "local.slash", payload: {}, command, ok: false, output: `error ${code}: ${err.message}`, at: Date.now() });
  }
}

async function interrupt() {
  const s = app.current ? app.sessions.get(app.current) : null;
  if (!s) return;
  try {
    const result = await conn.call(Method.SESSION_INTERRUPT, { session_id: s.id });
    if (result.status === "not_running") announce("Nothing was running.");
    else announce("Interrupt requested.");
  } catch (err) {
    showNotice(`Could not interrupt: ${err.message}`);
  }
}

function toggleShowAll() {
  const s = app.current ? app.sessions.get(app.current) : null;
  if (!s) return;
  // Rebuild the view from the log, with or without the cap.
  const capped = !s.view.capped;
  forget(s.view);
  s.view = new SessionView();
  s.view.capped = capped;
  for (const entry of s.log) render(s.view, entry.rec);
  if (s.logDropped) s.view.root.prepend(el("p", "trim-note", "The oldest output is no longer kept by this page."));
  $("transcript").replaceChildren(s.view.root);
  updateShowAll(s);
}

// ---- session list ---------------------------------------------------------------------------------------
const listItems = new Map(); // session_id -> {li, pick, title, meta, close}
let listTimer = null;

async function refreshList() {
  if (conn.state !== ConnState.CONNECTED) return;
  const known = new Set(app.sessions.keys()); // sessions created while the call is in flight are not stale
  try {
    const result = await conn.call(Method.SESSION_ACTIVE_LIST);
    const live = new Set();
    for (const info of result.sessions || []) {
      live.add(info.session_id);
      const s = sessionRecord(info.session_id, info);
      s.closed = false;
    }
    for (const s of app.sessions.values()) {
      if (known.has(s.id) && !live.has(s.id) && !s.closed) {
        s.closed = true;
        s.owned = false;
        s.running = null;
      }
    }
  } catch (err) {
    return;
  }
  renderList();
  updateControls();
  schedulePersist();
}

function scheduleListRefresh() {
  clearTimeout(listTimer);
  listTimer = setTimeout(refreshList, 100);
}

function renderList() {
  const list = $("session-list");
  const live = Array.from(app.sessions.values()).filter((s) => !s.closed);
  live.sort((a, b) => String(a.createdAt || "").localeCompare(String(b.createdAt || "")));
  const focused = document.activeElement;
  for (const [id, item] of listItems) {
    if (!live.some((s) => s.id === id)) {
      if (item.li.contains(focused)) $("create-button").focus();
      item.li.remove();
      listItems.delete(id);
    }
  }
  for (const s of live) {
    let item = listItems.get(s.id);
    if (!item) {
      const li = el("li");
      const pickButton = el("button", "session-pick");
      pickButton.type = "button";
      const title = el("span", "s-title");
      const meta = el("span", "s-meta");
      pickButton.append(title, meta);
      pickButton.addEventListener("click", () => pick(s.id));
      const close = el("button", "session-close small", "Close");
      close.type = "button";
      close.addEventListener("click", () => closeSession(s.id));
      li.append(pickButton, close);
      item = { li, pick: pickButton, title, meta, close };
      listItems.set(s.id, item);
    }
    const name = s.title || s.id;
    const where = s.owned ? "here" : s.attached ? "attached elsewhere" : "detached";
    const action = s.owned ? "Show" : "Resume";
    item.title.textContent = name;
    item.meta.textContent = `${s.agent} · ${s.running ? "running" : s.status || "idle"} · ${where}`;
    item.pick.setAttribute("aria-label", `${action} session ${name} (${s.agent}, ${where})`);
    item.pick.setAttribute("aria-current", s.id === app.current ? "true" : "false");
    item.close.setAttribute("aria-label", `Close session ${name}`);
    item.li.dataset.sessionId = s.id;
    if (item.li.parentNode !== list) list.append(item.li);
  }
  // Keep DOM order equal to `live` order without touching nodes that are already in place.
  live.forEach((s, index) => {
    const li = listItems.get(s.id).li;
    if (list.children[index] !== li) list.insertBefore(li, list.children[index] || null);
  });
  $("session-list-empty").hidden = live.length > 0;
}

// ---------------------------------------------------------------------------------------------------------
// Terminals: several can be open; one is shown at a time
// ---------------------------------------------------------------------------------------------------------
const terminalHooks = {
  status: (view, text) => { if (view.id === app.activeTerminal || !app.activeTerminal) $("term-status").textContent = text; },
  ended: () => { renderTerminals(); schedulePersist(); },
  leave: () => $("term-close-button").focus(),
};

async function probeXterm() {
  app.termAvailable = await xtermInstalled();
  if (!app.termAvailable) {
    $("tab-terminal").textContent = "Terminal (unavailable)";
    $("term-status").textContent = "The terminal needs xterm.js, which is not installed on this server: " +
      "gateway/static/vendor/ is missing. Run `make browser-deps` (it needs npm) and reload this page.";
  }
  updateControls();
}

function newTerminalView() {
  $("terminal").hidden = false;
  return new TerminalView($("terminal"), terminalHooks);
}

function showTerminal(id) {
  app.activeTerminal = id;
  for (const [tid, view] of app.terminals) {
    view.container.hidden = tid !== id;
    if (tid === id) {
      view.scheduleFit();
      $("term-status").textContent = view.statusText;
    }
  }
  if (!id) $("term-status").textContent = "No terminal open.";
  $("terminal").hidden = !id;
  renderTerminals();
  updateControls();
}

function renderTerminals() {
  const list = $("term-list");
  const shown = Array.from(app.terminals.values()).map((view) => {
    const li = el("li");
    const button = el("button", "term-pick small secondary", `Terminal ${view.id}${view.ended ? " (ended)" : ""}`);
    button.type = "button";
    button.setAttribute("aria-current", view.id === app.activeTerminal ? "true" : "false");
    button.addEventListener("click", () => { showTerminal(view.id); view.xterm.focus(); });
    li.append(button);
    return li;
  });
  const others = app.otherTerminals.filter((t) => !app.terminals.has(t.terminal_id)).map((t) => {
    const li = el("li");
    const button = el("button", "term-reattach small secondary", `Reattach terminal ${t.terminal_id}`);
    button.type = "button";
    button.title = `pid ${t.pid}, ${t.cols}×${t.rows}, opened ${t.created_at || "earlier"}; nobody is attached to it`;
    button.addEventListener("click", () => reattachTerminal(t.terminal_id));
    li.append(button);
    return li;
  });
  list.replaceChildren(...shown, ...others);
}

/** Show a terminal that terminal.list reported and nobody is attached to (opened by an earlier page). */
async function reattachTerminal(id) {
  try { await loadXterm(); } catch (e) { return; }
  app.otherTerminals = app.otherTerminals.filter((t) => t.terminal_id !== id);
  if (!app.terminals.has(id)) {
    const view = newTerminalView();
    app.terminals.set(id, view);
    view.attach(id, false);
  }
  showTerminal(id);
  schedulePersist();
}

async function openTerminal() {
  if (!app.termAvailable) return;
  $("term-open-button").disabled = true;
  try {
    await loadXterm();
  } catch (err) {
    $("term-status").textContent = `The terminal is unavailable: ${err.message}. Run \`make browser-deps\` and reload.`;
    updateControls();
    return;
  }
  const view = newTerminalView();
  for (const other of app.terminals.values()) other.container.hidden = true;
  try {
    const result = await conn.call(Method.TERMINAL_OPEN, view.proposedSize());
    view.attach(result.terminal_id, false);
    app.terminals.set(view.id, view);
    showTerminal(view.id);
    schedulePersist();
  } catch (err) {
    view.dispose();
    showTerminal(app.activeTerminal);
    $("term-status").textContent = `Could not open a terminal: ${err.message}`;
  }
  updateControls();
}

async function closeTerminal() {
  const view = app.terminals.get(app.activeTerminal);
  if (!view) return;
  app.terminals.delete(view.id);
  if (conn.state === ConnState.CONNECTED && !view.ended) {
    try { await conn.call(Method.TERMINAL_CLOSE, { terminal_id: view.id }); } catch (e) { /* already gone */ }
  }
  view.dispose();
  const next = Array.from(app.terminals.keys()).pop() || null;
  showTerminal(next);
  schedulePersist();
  $("term-open-button").focus();
}

/**
 * Reattach the terminals the page had before a reload (terminal.list says which still exist), and offer
 * the other terminals nobody is attached to.
 */
async function restoreTerminals(ids) {
  if (!app.termAvailable || (app.terminalListSupported === false && !ids.length)) return;
  let live = null;
  try {
    const result = await conn.call(Method.TERMINAL_LIST);
    const listed = Array.isArray(result.terminals) ? result.terminals : [];
    live = new Set(listed.map((t) => t.terminal_id));
    app.terminalListSupported = true;
    app.otherTerminals = listed.filter((t) => !t.attached && !ids.includes(t.terminal_id)
      && !app.terminals.has(t.terminal_id));
    renderTerminals();
  } catch (err) {
    // An older gateway without terminal.list: try each remembered terminal; 4404 says it is gone.
    if (err.code !== ErrorCode.METHOD_NOT_FOUND) { app.restoredTerminals = ids; return; }
    app.terminalListSupported = false;
  }
  const wanted = ids.filter((id) => !app.terminals.has(id) && (live === null || live.has(id)));
  if (!wanted.length) { schedulePersist(); return; }
  try { await loadXterm(); } catch (e) { return; }
  for (const id of wanted) {
    const view = newTerminalView();
    view.container.hidden = true;
    app.terminals.set(id, view);
    view.attach(id, false);
  }
  showTerminal(wanted[wanted.length - 1]);
  schedulePersist();
}

// ---------------------------------------------------------------------------------------------------------
// Tabs (WAI-ARIA tabs pattern: arrow keys move between tabs, Tab moves into the panel)
// ---------------------------------------------------------------------------------------------------------
function activateTab(tab, focus) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const view = app.terminals.get(app.activeTerminal);
  if (tab.id === "tab-terminal" && view) view.scheduleFit();
}

function wireTabs() {
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  for (const tab of tabs) {
    tab.addEventListener("click", () => activateTab(tab, false));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      let next = null;
      if (e.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
      else if (e.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
      else if (e.key === "Home") next = tabs[0];
      else if (e.key === "End") next = tabs[tabs.length - 1];
      if (next) {
        e.preventDefault();
        activateTab(next, true);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------------------
setFrameHooks({
  before: () => {
    const t = $("transcript");
    return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
  },
  after: (stick) => {
    const s = app.current ? app.sessions.get(app.current) : null;
    if (s && stick) $("transcript").scrollTop = $("transcript").scrollHeight;
    if (s) updateShowAll(s);
  },
});

async function init() {
  wireTabs();
  $("create-form").addEventListener("submit", createSession);
  $("prompt-form").addEventListener("submit", submitPrompt);
  $("slash-form").addEventListener("submit", runSlash);
  $("prompt-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      $("prompt-form").requestSubmit();
    }
  });
  $("options-input").addEventListener("input", () => setOptionsError(""));
  $("interrupt-button").addEventListener("click", interrupt);
  $("show-all-button").addEventListener("click", toggleShowAll);
  $("refresh-button").addEventListener("click", refreshList);
  $("term-open-button").addEventListener("click", openTerminal);
  $("term-close-button").addEventListener("click", closeTerminal);
  window.addEventListener("offline", () => {
    conn.goOffline();
    for (const view of app.terminals.values()) view.suspend("the browser went offline");
  });
  window.addEventListener("online", () => conn.goOnline());
  // pagehide (not beforeunload): it also fires when a tab is closed or put in the back/forward cache.
  window.addEventListener("pagehide", () => persistNow(true));
  window.addEventListener("pageshow", (e) => { if (e.persisted) persistNow(false); }); // back from the bfcache
  setInterval(() => { if (!document.hidden) refreshList(); }, LIST_REFRESH_MS);
  await Promise.all([loadRich(), probeXterm()]); // rich text first, so restored records render as live ones
  document.body.dataset.rich = richAvailable() ? "on" : "off";
  restore();
  conn.connect();
}

// Introspection for tests/e2e/test_browser.py (and for people debugging in the console); sendRaw is its one write.
window.wgDebug = {
  state: () => conn.state,
  /** Every connection state the page went through, in order (e.g. connected, reconnecting, connected). */
  states: () => conn.history.slice(),
  connects: () => conn.connects,
  current: () => app.current,
  session: (id) => {
    const s = app.sessions.get(id || app.current);
    if (!s) return null;
    return { id: s.id, owned: s.owned, closed: s.closed, running: s.running, ...s.seq.stats() };
  },
  /** Concatenated text of one event type as this page received it (from the log, not the DOM). */
  text: (type, id) => {
    const s = app.sessions.get(id || app.current);
    if (!s) return "";
    return s.log.filter((e) => e.rec.type === type).map((e) => e.rec.payload.text || "").join("");
  },
  /** Send a raw frame on the JSON-RPC socket (tests use it to make the server close the socket). */
  sendRaw: (data) => { if (conn.ws) conn.ws.send(data); },
  flushed: () => allFlushed(),
  rich: () => richAvailable(),
  terminalList: () => app.terminalListSupported,
  terminals: () => Array.from(app.terminals.values()).map((v) => ({ id: v.id, open: v.isOpen(), ended: v.ended })),
  terminal: () => {
    const view = app.terminals.get(app.activeTerminal);
    return view ? { id: view.id, cols: view.xterm.cols, rows: view.xterm.rows, open: view.isOpen() } : null;
  },
};

init();
