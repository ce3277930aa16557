/*
 * What the page had open, kept in localStorage per gateway (origin + path) and per tab, so a reload or a
 * reopened tab resumes its sessions from the last seq it rendered and reattaches its terminals, while two
 * open tabs never take each other's sessions.  A tab finds its own entry by an id kept in sessionStorage
 * (which survives a reload); a new tab adopts the newest entry of a tab that was closed.  The encoding, the
 * size budget and the adoption rule are pure functions (tests/js/store.test.mjs); PageStore is the shell.
 */

export const STORE_VERSION = 1;
export const DEFAULT_BUDGET_CHARS = 2 * 1024 * 1024; // localStorage holds about 5 M characters per origin
export const CLOSED_ENTRY_TTL_MS = 24 * 3600 * 1000;  // a closed tab's entry older than this is dropped

/** One key per gateway: two gateways on one host (ports, or sub-paths behind a proxy) keep apart. */
export function storageKey(origin, pathname) {
  const dir = String(pathname || "/").replace(/[^/]*$/, "");
  return `worker-gateway:${origin}${dir}`;
}

function emptyState() {
  return { version: STORE_VERSION, current: null, sessions: [], terminals: [], closed: false, savedAt: 0 };
}

/** The key of one tab's entry under a gateway's key. */
export function tabKey(gatewayKey, tabId) {
  return `${gatewayKey}#tab:${tabId}`;
}

/**
 * Which closed tab's entry a new tab adopts (the newest), and which entries are stale.
 * entries: [{key, closed, savedAt}]; returns {adopt: key|null, prune: [keys]}.
 */
export function chooseOrphan(entries, now, ttlMs = CLOSED_ENTRY_TTL_MS) {
  let adopt = null;
  let newest = -Infinity;
  const prune = [];
  for (const entry of entries) {
    if (now - entry.savedAt > ttlMs) { prune.push(entry.key); continue; } // also a tab that crashed long ago
    if (!entry.closed) continue; // an open tab's entry is that tab's
    if (entry.savedAt > newest) { newest = entry.savedAt; adopt = entry.key; }
  }
  return { adopt, prune };
}

/**
 * Encode the page state within `budget` characters.  sessions: [{id, lastSeq, complete, chars, log}] where
 * `log` is the records rendered since seq 1 and `complete` says the log holds all of them.  A session whose
 * log does not fit (largest first) is kept with lastSeq 0 and no log: the gateway replays what it buffers.
 */
export function encodeState(state, budget = DEFAULT_BUDGET_CHARS) {
  const sessions = (state.sessions || []).map((s) => ({
    id: s.id, lastSeq: s.lastSeq, complete: Boolean(s.complete), chars: s.chars || 0, log: s.log || [],
  }));
  const out = {
    version: STORE_VERSION,
    closed: Boolean(state.closed),
    savedAt: state.savedAt || 0,
    current: state.current || null,
    terminals: (state.terminals || []).map((t) => ({ id: t.id })),
    sessions: [],
  };
  const strip = (s) => ({ id: s.id, lastSeq: 0, log: [] });
  // Sessions whose log is not complete, or obviously too big, never get their log serialised.
  let kept = sessions.map((s) => (s.complete && s.chars <= budget ? s : strip(s)));
  for (;;) {
    out.sessions = kept.map((s) => ({ id: s.id, lastSeq: s.lastSeq, log: s.log }));
    const text = JSON.stringify(out);
    if (text.length <= budget) return text;
    let largest = -1;
    let largestLen = 0;
    kept.forEach((s, i) => {
      const len = s.log.length ? JSON.stringify(s.log).length : 0;
      if (len > largestLen) { largest = i; largestLen = len; }
    });
    if (largest < 0) return text; // nothing left to drop: ids alone
    kept = kept.map((s, i) => (i === largest ? strip(s) : s));
  }
}

/** Decode what encodeState wrote; anything unreadable or from another version yields an empty state. */
export function decodeState(text) {
  if (typeof text !== "string" || !text) return emptyState();
  let raw;
  try { raw = JSON.parse(text); } catch (e) { return emptyState(); }
  if (!raw || raw.version !== STORE_VERSION) return emptyState();
  const state = emptyState();
  state.current = typeof raw.current === "string" ? raw.current : null;
  state.closed = raw.closed === true;
  state.savedAt = typeof raw.savedAt === "number" ? raw.savedAt : 0;
  for (const s of Array.isArray(raw.sessions) ? raw.sessions : []) {
    if (!s || typeof s.id !== "string") continue;
    const lastSeq = Number.isInteger(s.lastSeq) && s.lastSeq > 0 ? s.lastSeq : 0;
    const log = Array.isArray(s.log) && lastSeq > 0 ? s.log.filter((r) => r && typeof r.type === "string") : [];
    state.sessions.push({ id: s.id, lastSeq: log.length ? lastSeq : 0, log });
  }
  for (const t of Array.isArray(raw.terminals) ? raw.terminals : []) {
    if (t && typeof t.id === "string") state.terminals.push({ id: t.id });
  }
  return state;
}

/**
 * The thin shell over a Storage (window.localStorage): this tab's entry under `gatewayKey`.  A full, missing
 * or refusing storage never throws: the page then just does not remember.
 */
export class PageStore {
  constructor(storage, gatewayKey, tabId, budget = DEFAULT_BUDGET_CHARS, now = () => Date.now()) {
    this.storage = storage;
    this.gatewayKey = gatewayKey;
    this.key = tabKey(gatewayKey, tabId);
    this.budget = budget;
    this.now = now;
  }

  /** This tab's entry (a reload), else the newest closed tab's (a reopened tab), which is then ours. */
  load() {
    try {
      if (!this.storage) return emptyState();
      const own = this.storage.getItem(this.key);
      if (own) return decodeState(own);
      const entries = [];
      for (let i = 0; i < this.storage.length; i++) {
        const key = this.storage.key(i);
        if (!key || !key.startsWith(`${this.gatewayKey}#tab:`)) continue;
        const state = decodeState(this.storage.getItem(key));
        entries.push({ key, closed: state.closed, savedAt: state.savedAt });
      }
      const { adopt, prune } = chooseOrphan(entries, this.now());
      for (const key of prune) this.storage.removeItem(key);
      if (!adopt) return emptyState();
      const state = decodeState(this.storage.getItem(adopt));
      this.storage.removeItem(adopt);
      return state;
    } catch (e) {
      return emptyState();
    }
  }

  /** Save this tab's state; `closed` marks the tab as going away (pagehide), so a new tab may adopt it. */
  save(state, closed = false) {
    if (!this.storage) return false;
    const stamped = { ...state, closed, savedAt: this.now() };
    let budget = this.budget;
    for (let tries = 0; tries < 4; tries++) {
      try {
        this.storage.setItem(this.key, encodeState(stamped, budget));
        return true;
      } catch (e) {
        budget = Math.floor(budget / 4); // over the quota (other keys use it too): keep less
      }
    }
    return false;
  }

  clear() {
    try { if (this.storage) this.storage.removeItem(this.key); } catch (e) { /* nothing to clear */ }
  }
}
