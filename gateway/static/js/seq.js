/*
 * Per-session seq bookkeeping (PROTOCOL section 4: seq is 1, 2, 3... with no gaps).  Pure: no DOM, no I/O,
 * so tests/js/seq.test.mjs runs it under `node --test`.
 */

export const SeqVerdict = Object.freeze({
  NEW: "new",               // the next event: render it
  GAP: "gap",               // newer than expected: render it, but something was missed
  DUPLICATE: "duplicate",   // already rendered (a replay overlapping what we had): drop it
  UNSEQUENCED: "unsequenced", // an event without a seq (gateway.ready): not ours to count
});

/** Tracks the last seq rendered for one session and counts duplicates and unexpected gaps. */
export class SeqTracker {
  constructor(lastSeq = 0, events = 0) {
    this.lastSeq = lastSeq;
    this.events = events;
    this.duplicates = 0;
    this.gaps = 0;
    this.expectGap = false; // a resume said "truncated": the next jump is announced, not a bug
  }

  /** Classify an arriving event and, unless it is a duplicate, advance past it. */
  accept(seq, type) {
    if (typeof seq !== "number" || !Number.isInteger(seq)) return SeqVerdict.UNSEQUENCED;
    if (seq <= this.lastSeq) {
      this.duplicates += 1;
      return SeqVerdict.DUPLICATE;
    }
    const announced = type === "replay.truncated" || this.expectGap;
    const verdict = seq === this.lastSeq + 1 || announced ? SeqVerdict.NEW : SeqVerdict.GAP;
    if (verdict === SeqVerdict.GAP) this.gaps += 1;
    this.expectGap = type === "replay.truncated";
    this.lastSeq = seq;
    this.events += 1;
    return verdict;
  }

  /** The server said the replay starts later than asked (session.resume's `truncated`). */
  announceGap() {
    this.expectGap = true;
  }

  stats() {
    return { lastSeq: this.lastSeq, events: this.events, duplicates: this.duplicates, gaps: this.gaps };
  }
}
