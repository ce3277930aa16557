/*
 * worker-gateway dashboard: one JSON-RPC WebSocket (/ws) plus one terminal socket (/pty/{id}).
 *
 * The contract is docs/protocol.md.  What this file adds on top of it:
 *  - reconnect with jittered exponential backoff, then `session.resume` from the last seq seen for every
 *    session this page owned, dropping events whose seq was already seen (so nothing is lost or doubled);
 *  - rendering that never freezes the page: text is queued and appended once per animation frame within a
 *    budget, and each session keeps at most DOM_CAP_CHARS of text in the DOM ("Show all" lifts the cap);
 *  - `window.wgDebug`, a small test hook (mostly read-only) used by tests/test_browser.py.
 * No framework, no build step; every piece of server text goes through textContent, never innerHTML.
 */
"use strict";

(function () {
  // The server set the HttpOnly cookie on this response: the token must not stay in history or bookmarks.
  const here = new URL(window.location.href);
  if (here.searchParams.has("token")) {
    here.searchParams.delete("token");
    window.history.replaceState(null, "", here.pathname + here.search + here.hash);
  }

  const DOM_CAP_CHARS = 256 * 1024;       // text kept in the DOM per session while capped
  const LOG_CAP_CHARS = 32 * 1024 * 1024; // text kept in memory per session (what "Show all" can show)
  const FRAME_BUDGET_CHARS = 64 * 1024;   // text appended to the DOM per animation frame (layout cost)
  const SEGMENT_CHARS = 8 * 1024;         // text per block-level segment (see SessionView.appendText)
  const MAX_TURNS_IN_DOM = 200;
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 8000;
  const HEARTBEAT_MS = 15000;             // gateway.ping; the server's own ping is off on loopback binds
  const HEARTBEAT_TIMEOUT_MS = 10000;
  const LIST_REFRESH_MS = 5000;
  const CALL_TIMEOUT_MS = 60000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  };
  const wsUrl = (path) => (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;

  class RpcError extends Error {
    constructor(code, message, data) {
      super(message);
      this.code = code;
      this.data = data;
    }
  }

  // ---------------------------------------------------------------------------------------------------
  // The JSON-RPC connection: one socket at a time, replaced on every reconnect.
  // ---------------------------------------------------------------------------------------------------
  class Connection {
    constructor(handlers) {
      this.handlers = handlers; // {onReady(payload), onEvent(params), onState(state, detail)}
      this.ws = null;
      this.ready = false;
      this.nextId = 1;
      this.pending = new Map();
      this.attempt = 0;
      this.retryTimer = null;
      this.heartbeatTimer = null;
      this.connects = 0;
      this.state = "connecting";
      this.history = ["connecting"];
      this.maxMessageBytes = 1024 * 1024; // replaced by gateway.info's limits.max_message_bytes
      this.encoder = new TextEncoder();
    }

    setState(state, detail) {
      if (state !== this.state) {
        this.history.push(state);
        if (this.history.length > 100) this.history.shift();
      }
      this.state = state;
      this.handlers.onState(state, detail || "");
    }

    connect() {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      if (this.ws) return;
      const ws = new WebSocket(wsUrl("/ws"));
      this.ws = ws;
      this.ready = false;
      ws.onmessage = (ev) => { if (this.ws === ws) this.onMessage(ev.data); };
      ws.onclose = (ev) => { if (this.ws === ws) this.lost(`closed (code ${ev.code})`); };
      ws.onerror = () => { /* onclose follows and carries the decision */ };
    }

    onMessage(raw) {
      let msg;
      try { msg = JSON.parse(raw); } catch (e) { return; }
      if (msg.method === "event" && msg.params) {
        const params = msg.params;
        if (params.type === "gateway.ready") {
          this.ready = true;
          this.attempt = 0;
          this.connects += 1;
          this.startHeartbeat();
          this.setState("connected");
          this.handlers.onReady(params.payload || {});
          return;
        }
        this.handlers.onEvent(params);
        return;
      }
      if (msg.id !== undefined && msg.id !== null && this.pending.has(msg.id)) {
        const call = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        clearTimeout(call.timer);
        if (msg.error) call.reject(new RpcError(msg.error.code, msg.error.message, msg.error.data));
        else call.resolve(msg.result);
      }
    }

    /** Send a request; the promise rejects with RpcError on an error response or a lost connection. */
    call(method, params, timeoutMs) {
      return new Promise((resolve, reject) => {
        if (!this.ws || !this.ready || this.ws.readyState !== WebSocket.OPEN) {
          reject(new RpcError(-1, "not connected to the gateway; wait until the status says connected"));
          return;
        }
        const id = this.nextId++;
        const msg = { jsonrpc: "2.0", id, method };
        if (params) msg.params = params;
        const data = JSON.stringify(msg);
        // The gateway closes the connection (1009) on a frame over its limit: refuse it here instead.
        if (data.length > this.maxMessageBytes / 3 && this.encoder.encode(data).length > this.maxMessageBytes) {
          reject(new RpcError(-3, `${method}: the request is larger than the gateway's limit of ` +
            `${Math.floor(this.maxMessageBytes / 1024)} KiB; send less text at once`));
          return;
        }
        const timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new RpcError(-2, `${method}: no answer within ${Math.round((timeoutMs || CALL_TIMEOUT_MS) / 1000)} s`));
        }, timeoutMs || CALL_TIMEOUT_MS);
        this.pending.set(id, { resolve, reject, timer });
        this.ws.send(data);
      });
    }

    startHeartbeat() {
      clearInterval(this.heartbeatTimer);
      const ws = this.ws;
      this.heartbeatTimer = setInterval(() => {
        if (this.ws !== ws) return;
        this.call("gateway.ping", null, HEARTBEAT_TIMEOUT_MS).catch((err) => {
          if (this.ws === ws && err.code === -2) this.lost("no answer to gateway.ping");
        });
      }, HEARTBEAT_MS);
    }

    /** Forget the current socket (whatever its state) and schedule the next attempt. */
    lost(why) {
      const ws = this.ws;
      const wasReady = this.ready;
      this.ws = null;
      this.ready = false;
      clearInterval(this.heartbeatTimer);
      if (ws) {
        ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(); } catch (e) { /* already closing */ }
      }
      for (const call of this.pending.values()) {
        clearTimeout(call.timer);
        call.reject(new RpcError(-1, "the connection to the gateway was lost"));
      }
      this.pending.clear();
      // Keep trying even when the browser says it is offline: navigator.onLine can be false on a machine
      // whose only interface is loopback, where the gateway is still reachable.
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
      const delay = base / 2 + Math.random() * base / 2;
      this.attempt += 1;
      if (navigator.onLine === false) this.setState("offline", "the browser is offline; retrying");
      else this.setState("reconnecting", why);
      this.retryTimer = setTimeout(() => this.connect(), delay);
      if (!wasReady) this.diagnose();
    }

    /** A handshake that never reached gateway.ready: tell "not signed in" from "server unreachable". */
    diagnose() {
      fetch("/static/app.js", { method: "HEAD", cache: "no-store", credentials: "same-origin" })
        .then((resp) => {
          if (resp.status === 403 && this.state !== "connected") {
            this.setState("offline", "not signed in: open the URL with ?token=… that the gateway printed");
          }
        })
        .catch(() => {
          if (this.state === "reconnecting") this.setState("reconnecting", "the gateway is unreachable; retrying");
        });
    }

    goOffline() {
      if (this.ws) this.lost("the browser went offline");
      else this.setState("offline", "the browser is offline; retrying");
    }

    goOnline() {
      this.attempt = 0;
      if (!this.ws) this.connect();
    }
  }

  // ---------------------------------------------------------------------------------------------------
  // Rendering: one view (a detached <div> unless selected) per session, fed from the session's event log.
  // ---------------------------------------------------------------------------------------------------
  const dirtyViews = new Set();
  let frameRequested = false;

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
    const transcript = $("transcript");
    const current = app.current ? app.sessions.get(app.current) : null;
    const stick = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
    for (const view of Array.from(dirtyViews)) {
      budget -= view.flush(budget);
      if (!view.queue.length) dirtyViews.delete(view);
      if (budget <= 0) break;
    }
    if (current && stick) transcript.scrollTop = transcript.scrollHeight;
    if (current) updateShowAll(current);
    if (dirtyViews.size) {
      frameRequested = true;
      requestAnimationFrame(flushFrame);
    }
  }

  class SessionView {
    constructor() {
      this.root = el("div", "session-view");
      this.turns = new Map();      // turn_id -> {el, last: {kind, el}, subagents: Map, done}
      this.queue = [];             // [{target, text, turn}] waiting for a frame
      this.queuedChars = 0;
      this.nodes = [];             // FIFO of {node, len, turn}: text nodes in the DOM, oldest first
      this.domChars = 0;
      this.capped = true;
      this.hiddenChars = 0;        // text not in the DOM because of the cap
    }

    turn(turnId, promptText) {
      let t = this.turns.get(turnId);
      if (!t) {
        const node = el("article", "turn");
        node.dataset.turn = turnId;
        node.append(el("div", "turn-prompt", promptText === undefined ? `(turn ${turnId})` : promptText));
        t = { el: node, last: null, subagents: new Map(), done: false, id: turnId };
        this.turns.set(turnId, t);
        this.root.append(node);
        this.dropOldTurns();
      } else if (promptText !== undefined) {
        t.el.firstChild.textContent = promptText;
      }
      return t;
    }

    /** The block that text of `kind` goes to: consecutive text of one kind shares a block. */
    block(t, kind, parentEl) {
      const container = parentEl || t.el;
      if (!parentEl && t.last && t.last.kind === kind && t.last.el.parentNode === container && !t.done) {
        return t.last.el;
      }
      const node = el("div", kind === "tool" ? "tool" : "reply");
      container.append(node);
      if (!parentEl) t.last = { kind, el: node };
      return node;
    }

    text(target, text, turn) {
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

    /** Append queued text within `budget` characters; returns the characters used. */
    flush(budget) {
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
      let used = 0;
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
      return used;
    }

    /**
     * Text goes into block-level segments of about SEGMENT_CHARS, cut only after a newline, so that the
     * browser lays out the last segment rather than the whole block on every frame, and so that trimming
     * drops whole segments.
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
        const node = document.createTextNode(piece);
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
        if (first.len <= excess) {
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

  /** Render one logged record (an event's params, or a local record such as a slash command) into `view`. */
  function render(view, rec) {
    const p = rec.payload || {};
    switch (rec.type) {
      case "turn.start": {
        view.turn(p.turn_id, p.text || "");
        break;
      }
      case "message.delta": {
        const t = view.turn(p.turn_id);
        if (p.subagent_id && t.subagents.has(p.subagent_id)) {
          view.text(t.subagents.get(p.subagent_id).log, p.text, t);
        } else {
          view.text(view.block(t, "reply"), p.text, t);
        }
        break;
      }
      case "tool.output": {
        const t = view.turn(p.turn_id);
        const sub = p.subagent_id ? subagentBlock(view, t, p.subagent_id, null) : null;
        const target = sub ? sub.toolBlock() : view.block(t, "tool");
        view.text(target, p.text, t);
        break;
      }
      case "subagent.start": {
        const t = view.turn(p.turn_id);
        const sub = subagentBlock(view, t, p.subagent_id, p);
        sub.setState("running");
        break;
      }
      case "subagent.progress": {
        const t = view.turn(p.turn_id);
        const sub = subagentBlock(view, t, p.subagent_id, null);
        const text = typeof p.text === "string" ? p.text : describe(p, ["turn_id", "subagent_id"]);
        if (typeof p.progress === "number") sub.setState(`running, ${Math.round(p.progress * 100)}%`);
        view.text(sub.log, text.endsWith("\n") ? text : text + "\n", t);
        break;
      }
      case "subagent.complete": {
        const t = view.turn(p.turn_id);
        const sub = subagentBlock(view, t, p.subagent_id, null);
        sub.setState(p.status || "complete");
        const rest = describe(p, ["turn_id", "subagent_id", "status"]);
        if (rest) view.text(sub.log, rest + "\n", t);
        break;
      }
      case "turn.complete": {
        const t = view.turn(p.turn_id);
        t.done = true;
        let text = `turn ${p.status || "complete"}`;
        if (p.exit_code !== undefined && p.exit_code !== null) text += `, exit code ${p.exit_code}`;
        if (p.error) text += `: ${p.error}`;
        view.line(`turn-end status-${p.status || "ok"}`, text, t);
        break;
      }
      case "worker.exited":
        view.line("system-line", `worker ${p.pid} exited (return code ${p.returncode}` +
          (p.signal ? `, signal ${p.signal}` : "") + (p.expected ? "" : ", unexpectedly") + ")");
        break;
      case "session.detached":
        view.line("system-line", `This page no longer receives this session's events (${p.reason || "detached"}).`);
        break;
      case "session.closed":
        view.line("system-line", `Session closed (${p.reason || "closed"}).`);
        break;
      case "replay.truncated":
        view.line("system-line", `The gateway no longer holds the output before event ${p.first_seq}; it is missing here.`);
        break;
      case "local.slash": {
        const box = el("div", "slash" + (rec.ok ? "" : " failed"));
        box.append(el("div", "slash-cmd", rec.command));
        const out = el("div", "slash-output");
        box.append(out);
        view.root.append(box);
        view.text(out, rec.output || (rec.ok ? "(no output)" : "(failed)"), null);
        break;
      }
      case "local.note":
        view.line("system-line", rec.text);
        break;
      default:
        view.line("system-line", `${rec.type}: ${describe(p, [])}`);
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

  // ---------------------------------------------------------------------------------------------------
  // Application state
  // ---------------------------------------------------------------------------------------------------
  const app = {
    sessions: new Map(), // session_id -> session record (below)
    current: null,
    epoch: null,
    agents: [],
    defaultAgent: null,
    terminal: null,
  };

  function sessionRecord(id, info) {
    let s = app.sessions.get(id);
    if (!s) {
      s = {
        id, agent: "", title: "", status: "", attached: false, createdAt: null,
        lastSeq: 0, owned: false, closed: false, running: null,
        log: [], logChars: 0, logDropped: false,
        view: new SessionView(),
        stats: { events: 0, duplicates: 0, gaps: 0 },
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
      : (rec.output ? rec.output.length : 0);
    s.log.push({ rec, len });
    s.logChars += len;
    while (s.logChars > LOG_CAP_CHARS && s.log.length > 1) {
      s.logChars -= s.log.shift().len;
      s.logDropped = true;
    }
    render(s.view, rec);
  }

  const LIST_CHANGING_EVENTS = new Set(["turn.start", "turn.complete", "session.detached", "session.closed"]);

  function onEvent(params) {
    const id = params.session_id;
    if (!id) return;
    const s = sessionRecord(id);
    if (typeof params.seq === "number") {
      if (params.seq <= s.lastSeq) { s.stats.duplicates += 1; return; }
      if (params.seq !== s.lastSeq + 1 && params.type !== "replay.truncated" && !s.expectGap) s.stats.gaps += 1;
      s.expectGap = params.type === "replay.truncated";
      s.lastSeq = params.seq;
    }
    s.stats.events += 1;
    const p = params.payload || {};
    switch (params.type) {
      case "turn.start": s.running = p.turn_id; s.status = "running"; break;
      case "turn.complete":
        if (s.running === p.turn_id) s.running = null;
        s.status = "idle";
        if (id === app.current) announce(`Turn ${p.status || "complete"}.`);
        break;
      case "session.detached":
        s.owned = false;
        if (id === app.current) showNotice("Another window resumed this session; select it again to take it back.");
        break;
      case "session.closed":
        s.owned = false;
        s.closed = true;
        s.running = null;
        scheduleListRefresh();
        break;
      default: break;
    }
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
      const info = await conn.call("gateway.info");
      if (info.limits && info.limits.max_message_bytes) conn.maxMessageBytes = info.limits.max_message_bytes;
      fillAgents(info.agents || [], info.default_agent);
    } catch (err) {
      showNotice(`gateway.info failed: ${err.message}`);
    }
    await Promise.all(Array.from(app.sessions.values()).filter((s) => s.owned && !s.closed).map(resume));
    await refreshList();
    updateControls();
    if (app.terminal) app.terminal.reconnect();
  }

  async function resume(s) {
    try {
      const result = await conn.call("session.resume", { session_id: s.id, after_seq: s.lastSeq });
      s.owned = true;
      s.status = result.status || s.status;
      if (result.truncated) s.expectGap = true;
      return true;
    } catch (err) {
      s.owned = false;
      if (err.code === 4001) {
        s.closed = true;
        s.running = null;
        record(s, { type: "local.note", payload: {}, text: "This session no longer exists on the gateway." });
      } else if (s.id === app.current) {
        showNotice(`Could not resume the session: ${err.message}`);
      }
      return false;
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
  });

  // ---------------------------------------------------------------------------------------------------
  // Controls
  // ---------------------------------------------------------------------------------------------------
  function fillAgents(agents, defaultAgent) {
    const select = $("agent-select");
    const previous = select.value;
    app.agents = agents;
    app.defaultAgent = defaultAgent;
    select.replaceChildren(...agents.map((name) => {
      const option = el("option", null, name);
      option.value = name;
      return option;
    }));
    select.value = agents.includes(previous) ? previous : (defaultAgent || agents[0] || "");
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
    const online = conn.state === "connected";
    const s = app.current ? app.sessions.get(app.current) : null;
    const usable = online && s && !s.closed;
    $("agent-select").disabled = !online || !app.agents.length;
    $("create-button").disabled = !online || !app.agents.length;
    $("prompt-input").disabled = !s || s.closed;
    $("send-button").disabled = !usable;
    $("slash-input").disabled = !s || s.closed;
    $("slash-button").disabled = !usable;
    $("interrupt-button").disabled = !usable || !s.running;
    $("term-open-button").disabled = !online || !termAvailable || Boolean(app.terminal);
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

  async function createSession(event) {
    event.preventDefault();
    const params = {};
    const agent = $("agent-select").value;
    const title = $("title-input").value.trim();
    if (agent) params.agent = agent;
    if (title) params.title = title;
    $("create-button").disabled = true;
    try {
      const result = await conn.call("session.create", params);
      const s = sessionRecord(result.session_id, { agent: result.agent, title, created_at: result.created_at, status: "idle", attached: true });
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
      await conn.call("session.close", { session_id: id });
      if (s) { s.closed = true; s.owned = false; s.running = null; }
    } catch (err) {
      showNotice(`Could not close the session: ${err.message}`);
    }
    await refreshList();
    updateControls();
  }

  async function submitPrompt(event) {
    event.preventDefault();
    const input = $("prompt-input");
    const text = input.value;
    const s = app.current ? app.sessions.get(app.current) : null;
    if (!s || !text.trim()) return;
    try {
      const result = await conn.call("prompt.submit", { session_id: s.id, text });
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
    try {
      const result = await conn.call("slash.exec", { session_id: s.id, command });
      input.value = "";
      showNotice("");
      record(s, { type: "local.slash", payload: {}, command, ok: Boolean(result.ok), output: String(result.output || "") });
      announce(result.ok ? `${command} done.` : `${command} failed.`);
    } catch (err) {
      record(s, { type: "local.slash", payload: {}, command, ok: false, output: `error ${err.code}: ${err.message}` });
    }
  }

  async function interrupt() {
    const s = app.current ? app.sessions.get(app.current) : null;
    if (!s) return;
    try {
      const result = await conn.call("session.interrupt", { session_id: s.id });
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
    dirtyViews.delete(s.view);
    s.view = new SessionView();
    s.view.capped = capped;
    for (const entry of s.log) render(s.view, entry.rec);
    if (s.logDropped) s.view.root.prepend(el("p", "trim-note", "The oldest output is no longer kept by this page."));
    $("transcript").replaceChildren(s.view.root);
    updateShowAll(s);
  }

  // ---- session list ---------------------------------------------------------------------------------
  const listItems = new Map(); // session_id -> {li, pick, title, meta, close}
  let listTimer = null;

  async function refreshList() {
    if (conn.state !== "connected") return;
    const known = new Set(app.sessions.keys()); // sessions created while the call is in flight are not stale
    try {
      const result = await conn.call("session.active_list");
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

  // ---------------------------------------------------------------------------------------------------
  // Terminal tab (xterm.js + fit addon from gateway/static/vendor/, filled by `make browser-deps`)
  // ---------------------------------------------------------------------------------------------------
  let termAvailable = false;
  let xtermLoading = null;

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`could not load ${src}`));
      document.head.append(script);
    });
  }

  function loadXterm() {
    if (!xtermLoading) {
      const css = document.createElement("link");
      css.rel = "stylesheet";
      css.href = "/static/vendor/xterm.css";
      document.head.append(css);
      xtermLoading = loadScript("/static/vendor/xterm.js").then(() => loadScript("/static/vendor/addon-fit.js"));
    }
    return xtermLoading;
  }

  async function probeXterm() {
    try {
      const resp = await fetch("/static/vendor/xterm.js", { method: "HEAD", cache: "no-store", credentials: "same-origin" });
      termAvailable = resp.ok;
    } catch (e) {
      termAvailable = false;
    }
    if (!termAvailable) {
      $("tab-terminal").textContent = "Terminal (unavailable)";
      $("term-status").textContent = "The terminal needs xterm.js, which is not installed on this server: " +
        "gateway/static/vendor/ is missing. Run `make browser-deps` (it needs npm) and reload this page.";
    }
    updateControls();
  }

  class TerminalView {
    constructor(container) {
      this.container = container;
      this.xterm = new window.Terminal({
        cursorBlink: true,
        fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
        fontSize: 13,
        scrollback: 5000,
      });
      this.fit = new window.FitAddon.FitAddon();
      this.xterm.loadAddon(this.fit);
      this.xterm.open(container);
      this.encoder = new TextEncoder();
      this.id = null;
      this.path = null;
      this.ws = null;
      this.ended = false;
      this.failures = 0;
      // Keyboard users must be able to leave the terminal: xterm.js keeps Tab for the shell.
      this.xterm.attachCustomKeyEventHandler((e) => {
        if (e.type === "keydown" && e.key === "F6") {
          e.preventDefault();
          $("term-close-button").focus();
          return false;
        }
        return true;
      });
      this.xterm.onData((data) => this.send(this.encoder.encode(data)));
      this.xterm.onBinary((data) => {
        const bytes = new Uint8Array(data.length);
        for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
        this.send(bytes);
      });
      this.xterm.onResize(({ cols, rows }) => this.sendResize(cols, rows));
      this.observer = new ResizeObserver(() => this.scheduleFit());
      this.observer.observe(container);
    }

    scheduleFit() {
      if (this.fitPending) return;
      this.fitPending = true;
      requestAnimationFrame(() => {
        this.fitPending = false;
        if (this.container.offsetParent !== null) {
          try { this.fit.fit(); } catch (e) { /* not laid out yet */ }
        }
      });
    }

    async open() {
      try { this.fit.fit(); } catch (e) { /* not laid out yet: the ResizeObserver fits it later */ }
      const dims = this.fit.proposeDimensions() || { cols: 80, rows: 24 };
      const result = await conn.call("terminal.open", { cols: dims.cols || 80, rows: dims.rows || 24 });
      this.id = result.terminal_id;
      this.path = result.path || `/pty/${result.terminal_id}`;
      this.connect(false);
    }

    connect(isReconnect) {
      if (this.ended || this.ws) return;
      const ws = new WebSocket(wsUrl(this.path));
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = () => {
        if (this.ws !== ws) return;
        this.failures = 0;
        // The server replays its last 1 MiB of output on every connect: start from a clean screen.
        if (isReconnect) this.xterm.reset();
        this.sendResize(this.xterm.cols, this.xterm.rows);
        setTermStatus(`Terminal ${this.id}. F6 leaves the terminal.`);
        this.xterm.focus();
      };
      ws.onmessage = (ev) => {
        if (this.ws !== ws) return;
        if (typeof ev.data === "string") this.xterm.write(ev.data);
        else this.xterm.write(new Uint8Array(ev.data));
      };
      ws.onclose = (ev) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (ev.code === 4410) {
          this.end("The terminal's process exited.");
        } else if (ev.code === 4409) {
          this.end("Another view took over this terminal.");
        } else if (!this.ended) {
          this.failures += 1;
          if (this.failures > 5) {
            this.end(`The terminal connection was lost (code ${ev.code}).`);
          } else {
            setTermStatus(`Terminal connection lost (code ${ev.code}); reconnecting…`);
            setTimeout(() => this.connect(true), Math.min(4000, 250 * 2 ** this.failures));
          }
        }
      };
    }

    reconnect() {
      if (!this.ws && !this.ended) this.connect(true);
    }

    /** Drop the socket but keep the terminal: it reconnects when the JSON-RPC channel is back. */
    suspend(why) {
      if (!this.ws) return;
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = null;
      try { ws.close(); } catch (e) { /* already closed */ }
      setTermStatus(`Terminal disconnected (${why}); it reconnects with the gateway.`);
    }

    send(bytes) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
    }

    sendResize(cols, rows) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "resize", cols, rows }));
    }

    end(why) {
      this.ended = true;
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        ws.onclose = null;
        try { ws.close(); } catch (e) { /* already closed */ }
      }
      setTermStatus(why);
    }

    dispose() {
      this.end("Terminal closed.");
      this.observer.disconnect();
      this.xterm.dispose();
      this.container.replaceChildren();
      this.container.hidden = true;
    }
  }

  function setTermStatus(text) {
    $("term-status").textContent = text;
  }

  async function openTerminal() {
    if (app.terminal || !termAvailable) return;
    $("term-open-button").disabled = true;
    try {
      await loadXterm();
    } catch (err) {
      setTermStatus(`The terminal is unavailable: ${err.message}. Run \`make browser-deps\` and reload.`);
      updateControls();
      return;
    }
    $("terminal").hidden = false;
    const view = new TerminalView($("terminal"));
    app.terminal = view;
    try {
      await view.open();
      $("term-close-button").disabled = false;
    } catch (err) {
      view.dispose();
      app.terminal = null;
      setTermStatus(`Could not open a terminal: ${err.message}`);
    }
    updateControls();
  }

  async function closeTerminal() {
    const view = app.terminal;
    if (!view) return;
    app.terminal = null;
    $("term-close-button").disabled = true;
    if (view.id && conn.state === "connected") {
      try { await conn.call("terminal.close", { terminal_id: view.id }); } catch (e) { /* already gone */ }
    }
    view.dispose();
    setTermStatus("No terminal open.");
    updateControls();
    $("term-open-button").focus();
  }

  // ---------------------------------------------------------------------------------------------------
  // Tabs (WAI-ARIA tabs pattern: arrow keys move between tabs, Tab moves into the panel)
  // ---------------------------------------------------------------------------------------------------
  function activateTab(tab, focus) {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    if (tab.id === "tab-terminal" && app.terminal) app.terminal.scheduleFit();
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

  // ---------------------------------------------------------------------------------------------------
  // Start-up
  // ---------------------------------------------------------------------------------------------------
  function init() {
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
    $("interrupt-button").addEventListener("click", interrupt);
    $("show-all-button").addEventListener("click", toggleShowAll);
    $("refresh-button").addEventListener("click", refreshList);
    $("term-open-button").addEventListener("click", openTerminal);
    $("term-close-button").addEventListener("click", closeTerminal);
    window.addEventListener("offline", () => {
      conn.goOffline();
      if (app.terminal) app.terminal.suspend("the browser went offline");
    });
    window.addEventListener("online", () => conn.goOnline());
    setInterval(() => { if (!document.hidden) refreshList(); }, LIST_REFRESH_MS);
    probeXterm();
    conn.connect();
  }

  // Introspection for tests/test_browser.py (and for people debugging in the console); sendRaw is its one write.
  window.wgDebug = {
    state: () => conn.state,
    /** Every connection state the page went through, in order (e.g. connected, reconnecting, connected). */
    states: () => conn.history.slice(),
    connects: () => conn.connects,
    current: () => app.current,
    session: (id) => {
      const s = app.sessions.get(id || app.current);
      if (!s) return null;
      return { id: s.id, lastSeq: s.lastSeq, owned: s.owned, closed: s.closed, running: s.running, ...s.stats };
    },
    /** Concatenated text of one event type as this page received it (from the log, not the DOM). */
    text: (type, id) => {
      const s = app.sessions.get(id || app.current);
      if (!s) return "";
      return s.log.filter((e) => e.rec.type === type).map((e) => e.rec.payload.text || "").join("");
    },
    /** Send a raw frame on the JSON-RPC socket (tests use it to make the server close the socket). */
    sendRaw: (data) => { if (conn.ws) conn.ws.send(data); },
    flushed: () => dirtyViews.size === 0,
    terminal: () => (app.terminal ? { id: app.terminal.id, cols: app.terminal.xterm.cols, rows: app.terminal.xterm.rows,
      open: Boolean(app.terminal.ws && app.terminal.ws.readyState === WebSocket.OPEN) } : null),
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
