/*
 * Terminals: xterm.js + its fit addon (from gateway/static/vendor/, filled by `make browser-deps`), one
 * TerminalView per terminal, each with its own /pty/{id} socket.  The gateway replays a terminal's last
 * 1 MiB of output on every connect, which is what restores a screen after a reconnect or a reload.
 */

import { CloseCode } from "./protocol.js";
import { el } from "./render.js";
import { wsUrl } from "./transport.js";

const VENDOR = new URL("../vendor/", import.meta.url);
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

/** Is xterm.js installed on this server?  (A HEAD request: nothing is loaded until a terminal opens.) */
export async function xtermInstalled() {
  try {
    const resp = await fetch(new URL("xterm.js", VENDOR), { method: "HEAD", cache: "no-store", credentials: "same-origin" });
    return resp.ok;
  } catch (e) {
    return false;
  }
}

export function loadXterm() {
  if (!xtermLoading) {
    const css = document.createElement("link");
    css.rel = "stylesheet";
    css.href = new URL("xterm.css", VENDOR).href;
    document.head.append(css);
    xtermLoading = loadScript(new URL("xterm.js", VENDOR).href)
      .then(() => loadScript(new URL("addon-fit.js", VENDOR).href));
  }
  return xtermLoading;
}

export class TerminalView {
  /** hooks: {status(view, text), ended(view), leave()}: how the view reports to the page. */
  constructor(parent, hooks) {
    this.hooks = hooks;
    this.container = el("div", "term-view");
    parent.append(this.container);
    this.xterm = new window.Terminal({
      cursorBlink: true,
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
      fontSize: 13,
      scrollback: 5000,
    });
    this.fit = new window.FitAddon.FitAddon();
    this.xterm.loadAddon(this.fit);
    this.xterm.open(this.container);
    this.encoder = new TextEncoder();
    this.id = null;
    this.ws = null;
    this.ended = false;
    this.failures = 0;
    this.statusText = "";
    // Keyboard users must be able to leave the terminal: xterm.js keeps Tab for the shell.
    this.xterm.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.key === "F6") {
        e.preventDefault();
        this.hooks.leave();
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
    this.observer.observe(this.container);
  }

  setStatus(text) {
    this.statusText = text;
    this.hooks.status(this, text);
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

  /** The size to ask terminal.open for: what fits the panel now. */
  proposedSize() {
    try { this.fit.fit(); } catch (e) { /* not laid out yet: the ResizeObserver fits it later */ }
    const dims = this.fit.proposeDimensions() || {};
    return { cols: dims.cols || 80, rows: dims.rows || 24 };
  }

  /** Attach to terminal `id` (just opened, or remembered from before a reload). */
  attach(id, isReconnect) {
    this.id = id;
    this.container.dataset.terminalId = id;
    this.connect(isReconnect);
  }

  connect(isReconnect) {
    if (this.ended || this.ws) return;
    const ws = new WebSocket(wsUrl(`pty/${encodeURIComponent(this.id)}`));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.failures = 0;
      // The server replays its last 1 MiB of output on every connect: start from a clean screen.
      if (isReconnect) this.xterm.reset();
      this.sendResize(this.xterm.cols, this.xterm.rows);
      this.setStatus(`Terminal ${this.id}. F6 leaves the terminal.`);
      if (this.container.offsetParent !== null) this.xterm.focus();
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      if (typeof ev.data === "string") this.xterm.write(ev.data);
      else this.xterm.write(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (ev.code === CloseCode.TERMINAL_EXITED) this.end("The terminal's process exited.");
      else if (ev.code === CloseCode.TERMINAL_SUPERSEDED) this.end("Another view took over this terminal.");
      else if (ev.code === CloseCode.TERMINAL_NOT_FOUND) this.end("The gateway no longer has this terminal.");
      else if (!this.ended) {
        this.failures += 1;
        if (this.failures > 5) {
          this.end(`The terminal connection was lost (code ${ev.code}).`);
        } else {
          this.setStatus(`Terminal connection lost (code ${ev.code}); reconnecting…`);
          setTimeout(() => this.connect(true), Math.min(4000, 250 * 2 ** this.failures));
        }
      }
    };
  }

  isOpen() {
    return Boolean(this.ws && this.ws.readyState === WebSocket.OPEN);
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
    this.setStatus(`Terminal disconnected (${why}); it reconnects with the gateway.`);
  }

  send(bytes) {
    if (this.isOpen()) this.ws.send(bytes);
  }

  sendResize(cols, rows) {
    if (this.isOpen()) this.ws.send(JSON.stringify({ type: "resize", cols, rows }));
  }

  end(why) {
    const first = !this.ended;
    this.ended = true;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      try { ws.close(); } catch (e) { /* already closed */ }
    }
    this.setStatus(why);
    if (first) this.hooks.ended(this);
  }

  dispose() {
    this.ended = true;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      try { ws.close(); } catch (e) { /* already closed */ }
    }
    this.observer.disconnect();
    this.xterm.dispose();
    this.container.remove();
  }
}
