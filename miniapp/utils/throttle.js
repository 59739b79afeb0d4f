// A pure throttle for rendering: `schedule()` asks for a run of `fn`, which happens at most once per `interval`
// ms (the first request after a quiet period runs on the next timer tick, later ones are batched into one run at
// the end of the interval). `flush()` runs a pending request now (the end of an answer), `cancel()` drops it.
// The clock and the timer functions are injectable so tests can drive time by hand.

'use strict';

function createThrottle(fn, opts) {
  const o = opts || {};
  const interval = o.interval === undefined ? 250 : o.interval;
  const now = o.now || (() => Date.now());
  const setTimer = o.setTimeout || ((f, ms) => setTimeout(f, ms));
  const clearTimer = o.clearTimeout || ((t) => clearTimeout(t));
  let timer = null;
  let last = -Infinity; // when fn last ran
  let runs = 0;

  function run() {
    timer = null;
    last = now();
    runs++;
    fn();
  }

  return {
    schedule() {
      if (timer !== null) return;
      const wait = Math.max(0, last + interval - now());
      timer = setTimer(run, wait);
    },
    flush() {
      if (timer === null) return false;
      clearTimer(timer);
      run();
      return true;
    },
    cancel() {
      if (timer !== null) clearTimer(timer);
      timer = null;
    },
    get pending() { return timer !== null; },
    get runs() { return runs; },
  };
}

module.exports = { createThrottle };
