/*
 * What the page had open, kept in localStorage per gateway (origin + path), so a reload or a reopened tab
 * resumes its sessions from the last seq it rendered and reattaches its terminals.  The encoding and the
 * size budget are pure functions (tests/js/store.test.mjs); PageStore is the thin shell over a Storage.
 */

export const STORE_VERSION = 1;
export const DEFAULT_BUDGET_CHARS = 2 * 1024 * 1024; // localStorage holds about 5 M characters per origin

/** One key per gateway: two gateways on one host (ports, or sub-paths behind a proxy) keep apart. */
export function storageKey(origin, pathname) {
  const dir = String(pathname || "/").replace(/[^/]*$/, "");
  return `worker-gateway:${origin}${dir}`;
}

function emptyState() {
  return { version: STORE_VERSION, current: null, sessions: [], terminals: [] };
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

/** The thin shell: a Storage (window.localStorage) under one key; a full or missing storage never throws. */
export class PageStore {
  constructor(storage, key, budget = DEFAULT_BUDGET_CHARS) {
    this.storage = storage;
    this.key = key;
    this.budget = budget;
  }

  load() {
    try { return decodeState(this.storage ? this.storage.getItem(this.key) : null); } catch (e) { return emptyState(); }
  }

  save(state) {
    if (!this.storage) return false;
    let budget = this.budget;
    for (let tries = 0; tries < 4; tries++) {
      try {
        this.storage.setItem(this.key, encodeState(state, budget));
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
