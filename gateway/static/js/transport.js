/*
 * The JSON-RPC connection to /ws: one socket at a time, replaced on every reconnect (jittered backoff),
 * with a gateway.ping heartbeat because the server's own ping is off for direct loopback peers.
 * Ids and deadlines live in pending.js; this file only does the socket I/O.
 */

import { EventType, JSONRPC_VERSION, LocalError, Method, SUBPROTOCOL } from "./protocol.js";
import { PendingCalls, RpcError, backoffDelay } from "./pending.js";

const HEARTBEAT_MS = 15000;
const HEARTBEAT_TIMEOUT_MS = 10000;
const CALL_TIMEOUT_MS = 60000;

export const ConnState = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
});

/** ws:// or wss:// URL of `path` relative to the page, so a gateway under a sub-path (/gw/) works. */
export function wsUrl(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

export class Connection {
  constructor(handlers, probeUrl) {
    this.handlers = handlers; // {onReady(payload), onEvent(params), onState(state, detail)}
    this.probeUrl = probeUrl; // a static file: its status tells "signed out" from "unreachable"
    this.ws = null;
    this.ready = false;
    this.pending = new PendingCalls();
    this.attempt = 0;
    this.retryTimer = null;
    this.heartbeatTimer = null;
    this.connects = 0;
    this.state = ConnState.CONNECTING;
    this.history = [ConnState.CONNECTING];
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
    // The token travels in the HttpOnly cookie; the subprotocol names the protocol version.
    const ws = new WebSocket(wsUrl("ws"), [SUBPROTOCOL]);
    this.ws = ws;
    this.ready = false;
    ws.onmessage = (ev) => { if (this.ws === ws) this.onMessage(ev.data); };
    ws.onclose = (ev) => { if (this.ws === ws) this.lost(`closed (code ${ev.code})`); };
    ws.onerror = () => { /* onclose follows and carries the decision */ };
  }

  onMessage(raw) {
    let msg;
    try { msg = JSON.parse(raw); } catch (e) { return; }
    if (!msg || typeof msg !== "object") return;
    if (msg.method === "event" && msg.params) {
      const params = msg.params;
      if (params.type === EventType.GATEWAY_READY) {
        this.ready = true;
        this.attempt = 0;
        this.connects += 1;
        this.startHeartbeat();
        this.setState(ConnState.CONNECTED);
        this.handlers.onReady(params.payload || {});
        return;
      }
      this.handlers.onEvent(params);
      return;
    }
    this.pending.answer(msg);
  }

  /** Send a request; the promise rejects with RpcError on an error response or a lost connection. */
  call(method, params, timeoutMs = CALL_TIMEOUT_MS) {
    if (!this.ws || !this.ready || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new RpcError(LocalError.NOT_CONNECTED,
        "not connected to the gateway; wait until the status says connected"));
    }
    const { id, promise } = this.pending.add(method, timeoutMs);
    const msg = { jsonrpc: JSONRPC_VERSION, id, method };
    if (params) msg.params = params;
    const data = JSON.stringify(msg);
    // The gateway closes the connection (1009) on a frame over its limit: refuse it here instead.
    if (data.length > this.maxMessageBytes / 3 && this.encoder.encode(data).length > this.maxMessageBytes) {
      this.pending.answer({ id, error: { code: LocalError.TOO_LARGE, message: `${method}: the request is larger ` +
        `than the gateway's limit of ${Math.floor(this.maxMessageBytes / 1024)} KiB; send less text at once` } });
      return promise;
    }
    this.ws.send(data);
    return promise;
  }

  startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    const ws = this.ws;
    this.heartbeatTimer = setInterval(() => {
      if (this.ws !== ws) return;
      this.call(Method.PING, null, HEARTBEAT_TIMEOUT_MS).catch((err) => {
        if (this.ws === ws && err.code === LocalError.TIMEOUT) this.lost("no answer to gateway.ping");
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
    this.pending.failAll("the connection to the gateway was lost");
    // Keep trying even when the browser says it is offline: navigator.onLine can be false on a machine
    // whose only interface is loopback, where the gateway is still reachable.
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    if (navigator.onLine === false) this.setState(ConnState.OFFLINE, "the browser is offline; retrying");
    else this.setState(ConnState.RECONNECTING, why);
    this.retryTimer = setTimeout(() => this.connect(), delay);
    if (!wasReady) this.diagnose();
  }

  /** A handshake that never reached gateway.ready: tell "not signed in" from "server unreachable". */
  diagnose() {
    fetch(this.probeUrl, { method: "HEAD", cache: "no-store", credentials: "same-origin" })
      .then((resp) => {
        if (resp.status === 403 && this.state !== ConnState.CONNECTED) {
          this.setState(ConnState.OFFLINE, "not signed in: reload this page to sign in with the token");
        }
      })
      .catch(() => {
        if (this.state === ConnState.RECONNECTING) this.setState(ConnState.RECONNECTING, "the gateway is unreachable; retrying");
      });
  }

  goOffline() {
    if (this.ws) this.lost("the browser went offline");
    else this.setState(ConnState.OFFLINE, "the browser is offline; retrying");
  }

  goOnline() {
    this.attempt = 0;
    if (!this.ws) this.connect();
  }
}
