/*
 * Slash command results can arrive twice: as a `slash.result` event in the session's stream (the history
 * that replays) and as the `slash.exec` response.  A gateway that does not emit the event yet only has the
 * response.  This ledger decides which one renders, so a result is shown exactly once either way.  Pure.
 */

export const SlashAction = Object.freeze({
  RENDER_LOCAL: "render_local", // the response is the only copy: show it (not part of the replayable history)
  SKIP: "skip",                 // the event carries it (or will): the response renders nothing
});

export class SlashLedger {
  constructor() {
    this.serverEmits = false; // once a slash.result event was seen, the gateway puts results in the stream
    this.seen = new Map();    // "session\0command" -> slash.result events seen
    this.local = new Map();   // "session\0command" -> [handles of locally rendered results not yet matched]
  }

  static key(sessionId, command) {
    return `${sessionId}\u0000${command}`;
  }

  /** Call when sending slash.exec: the token is handed back to `onResponse`. */
  begin(sessionId, command) {
    const key = SlashLedger.key(sessionId, command);
    return { key, seenBefore: this.seen.get(key) || 0 };
  }

  /** What to do with a slash.exec response. */
  onResponse(token) {
    if (this.serverEmits) return SlashAction.SKIP;
    return (this.seen.get(token.key) || 0) > token.seenBefore ? SlashAction.SKIP : SlashAction.RENDER_LOCAL;
  }

  /** Remember a locally rendered result, so a late event can replace it instead of doubling it. */
  rendered(token, handle) {
    const list = this.local.get(token.key) || [];
    list.push(handle);
    this.local.set(token.key, list);
  }

  /** A slash.result event arrived: returns the local handle it supersedes, or null. */
  onEvent(sessionId, command) {
    this.serverEmits = true;
    const key = SlashLedger.key(sessionId, command);
    this.seen.set(key, (this.seen.get(key) || 0) + 1);
    const list = this.local.get(key);
    if (!list || !list.length) return null;
    const handle = list.shift();
    if (!list.length) this.local.delete(key);
    return handle;
  }
}
