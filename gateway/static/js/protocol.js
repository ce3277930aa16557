/*
 * The wire vocabulary, mirrored from gateway/wire.py so the page names things as the server does.
 * tests/unit/test_wire_js.py parses this file and fails when the two disagree: keep one `NAME: value,` per line.
 */

export const PROTOCOL_VERSION = 1;
export const JSONRPC_VERSION = "2.0";
export const SUBPROTOCOL = "worker-gateway.v1";
export const TOKEN_SUBPROTOCOL_PREFIX = "worker-gateway.token.";
export const COOKIE_NAME = "wg_token";

export const ErrorCode = Object.freeze({
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
  NOT_FOUND: 4001,
  UNKNOWN_AGENT: 4004,
  BUSY: 4009,
  NOT_SUPPORTED: 4010,
  LIMIT_REACHED: 4029,
  WORKER_START_FAILED: 5001,
  WORKER_DIED: 5002,
  STORE_UNAVAILABLE: 5003,
});

/** Codes the page itself uses for failures that never reached the server (negative, outside JSON-RPC's). */
export const LocalError = Object.freeze({
  NOT_CONNECTED: -1,
  TIMEOUT: -2,
  TOO_LARGE: -3,
});

export const EventType = Object.freeze({
  GATEWAY_READY: "gateway.ready",
  TURN_START: "turn.start",
  MESSAGE_DELTA: "message.delta",
  REASONING_DELTA: "reasoning.delta",
  TOOL_CALL: "tool.call",
  TOOL_OUTPUT: "tool.output",
  SUBAGENT_START: "subagent.start",
  SUBAGENT_PROGRESS: "subagent.progress",
  SUBAGENT_COMPLETE: "subagent.complete",
  TURN_COMPLETE: "turn.complete",
  WORKER_EXITED: "worker.exited",
  SESSION_DETACHED: "session.detached",
  SESSION_CLOSED: "session.closed",
  REPLAY_TRUNCATED: "replay.truncated",
  SLASH_RESULT: "slash.result",
});

export const CloseReason = Object.freeze({
  CLIENT: "client",
  DISCONNECT: "disconnect",
  GRACE_EXPIRED: "grace_expired",
  IDLE_TIMEOUT: "idle_timeout",
  WORKER_DIED: "worker_died",
  SHUTDOWN: "shutdown",
  BLOCKED: "blocked",
  DELETED: "deleted",
});

export const TurnStatus = Object.freeze({
  OK: "ok",
  ERROR: "error",
  INTERRUPTED: "interrupted",
});

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
  TERMINAL_NOT_FOUND: 4404,
  TERMINAL_SUPERSEDED: 4409,
  TERMINAL_EXITED: 4410,
});

export const Method = Object.freeze({
  PING: "gateway.ping",
  INFO: "gateway.info",
  SESSION_CREATE: "session.create",
  SESSION_RESUME: "session.resume",
  SESSION_EVENTS_SINCE: "session.events.since",
  SESSION_ACK: "session.ack",
  SESSION_CLOSE: "session.close",
  SESSION_ACTIVE_LIST: "session.active_list",
  SESSION_LIST: "session.list",
  SESSION_DELETE: "session.delete",
  SESSION_INTERRUPT: "session.interrupt",
  PROMPT_SUBMIT: "prompt.submit",
  SLASH_EXEC: "slash.exec",
  TERMINAL_OPEN: "terminal.open",
  TERMINAL_RESIZE: "terminal.resize",
  TERMINAL_CLOSE: "terminal.close",
  TERMINAL_LIST: "terminal.list",
});
