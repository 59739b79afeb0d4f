// The WebSocket client: one `wx.connectSocket` at a time, a heartbeat, reconnects with exponential backoff and
// full jitter, and the session renewed when the edge revokes it.
//
// States: idle -> connecting (a ticket from POST /api/ws-ticket, then wx.connectSocket) -> open -> (closed by
// the edge, the network, or the heartbeat finding it dead) waiting -> connecting ... `stop()` goes back to idle.
// A new connection first closes the previous SocketTask and ignores every event of an older one, so at most one
// socket is ever live. `onOpen` is where the caller sends `resume` for every unfinished answer (chat.js).
//
// Heartbeat: a `{"type":"ping"}` every `heartbeatMs` (the edge answers `pong`); a socket that has sent nothing
// for `deadMs` is closed and reconnected (a phone that changed networks leaves a silent, half-open socket).
// Back in the foreground an open socket is probed at once: a ping that gets no frame within `probeMs` means dead.
// A connect that fails only through connectSocket's `fail`, or neither opens nor fails within `openMs`, counts as
// a close (1006) and is retried with backoff.
//
// Backoff: the n-th retry in a row waits random() * min(maxMs, baseMs * 2^n) (at least minMs); a successful open
// resets n. Close codes: 4401 (tokens revoked) -> the session is dropped and a new sign-in made before the
// reconnect; 1008 and other 4xxx (policy) -> reconnect with backoff, and after `maxPolicyCloses` in a row without
// an open in between the client gives up (state `failed`) until `start()`/`foreground()` is called again;
// 1013 (too slow: resume) and anything else -> reconnect with backoff.
//
// Timers, randomness and wx are injected (tests drive them by hand).

'use strict';

const CLOSE_REVOKED = 4401;
const CLOSE_POLICY = 1008;

class SocketClient {
  // opts: wx, api (wsTicket(), wsUrl(ticket), dropSession(), ensureToken()), onFrame(frame), onOpen(),
  // onState(state, info), random, setTimeout, clearTimeout, now, heartbeatMs, deadMs, baseMs, maxMs, minMs
  constructor(opts) {
    this.wx = opts.wx;
    this.api = opts.api;
    this.onFrame = opts.onFrame || (() => {});
    this.onOpen = opts.onOpen || (() => {});
    this.onState = opts.onState || (() => {});
    this.random = opts.random || Math.random;
    this.setTimer = opts.setTimeout || ((f, ms) => setTimeout(f, ms));
    this.clearTimer = opts.clearTimeout || ((t) => clearTimeout(t));
    this.now = opts.now || (() => Date.now());
    this.heartbeatMs = opts.heartbeatMs || 20000;
    this.deadMs = opts.deadMs || 45000;
    this.baseMs = opts.baseMs || 500;
    this.maxMs = opts.maxMs || 30000;
    this.minMs = opts.minMs === undefined ? 100 : opts.minMs;
    this.maxPolicyCloses = opts.maxPolicyCloses || 5;
    this.probeMs = opts.probeMs || 5000;
    this.openMs = opts.openMs || 15000; // a handshake not open by then is given up (connectSocket's own is 10 s)

    this.state = 'idle';
    this.task = null; // the live SocketTask
    this.attempt = 0; // retries in a row since the last open
    this.policyCloses = 0;
    this.lastError = null;
    this.delays = []; // backoff delays chosen (for tests and diagnostics)
    this._gen = 0; // bumps on every connect/stop: a stale ticket or task is ignored
    this._retry = null;
    this._beat = null;
    this._probeTimer = null;
    this._openTimer = null;
    this._lastRx = 0;
  }

  get open() {
    return this.state === 'open';
  }

  // Connect unless already connected or connecting.
  start() {
    if (this.state === 'open' || this.state === 'connecting') return;
    this.policyCloses = 0;
    this._connect();
  }

  // Back from the background (App.onShow): reconnect now if not open (no backoff wait); if open, the caller
  // resumes its answers on this socket. Returns true if the socket is open.
  foreground() {
    if (this.state === 'open') {
      this._probe(); // it may have died while the phone slept: a ping must be answered within probeMs
      return true;
    }
    if (this.state !== 'connecting') {
      this.attempt = 0;
      this.policyCloses = 0;
      this._connect();
    }
    return false;
  }

  // Close and stay closed (sign-out).
  stop() {
    this._gen++;
    this._clearRetry();
    this._stopBeat();
    this._closeTask(1000, 'bye');
    this._set('idle');
  }

  // Send a frame; false if the socket is not open (the caller resends on the next open).
  send(frame) {
    if (this.state !== 'open' || !this.task) return false;
    try {
      this.task.send({ data: JSON.stringify(frame) });
      return true;
    } catch (e) {
      return false;
    }
  }

  // ---- internals

  _set(state, info) {
    this.state = state;
    this.onState(state, info || null);
  }

  async _connect() {
    const gen = ++this._gen;
    this._clearRetry();
    this._stopBeat();
    this._closeTask(1000, 'reconnect');
    this._set('connecting');
    let ticket;
    try {
      ticket = await this.api.wsTicket();
    } catch (e) {
      if (gen !== this._gen) return;
      this.lastError = e;
      this._scheduleRetry(e);
      return;
    }
    if (gen !== this._gen) return; // stopped or superseded meanwhile
    let task;
    let early = null;
    // connectSocket reports some failures (a domain not in the socket whitelist, more than 5 sockets) only to
    // `fail`, with no onError/onClose: without it the client stayed `connecting` for good.
    const fail = (err) => {
      const why = (err && err.errMsg) || 'connectSocket:fail';
      if (!task) early = why;
      else if (task === this.task && this.state === 'connecting') this._lost(task, 1006, why);
    };
    try {
      task = this.wx.connectSocket({ url: this.api.wsUrl(ticket), timeout: 10000, fail });
    } catch (e) {
      this.lastError = e;
      this._scheduleRetry(e);
      return;
    }
    this.task = task;
    if (early) { this._lost(task, 1006, early); return; }
    // and a handshake that neither opens nor fails is given up after openMs
    this._openTimer = this.setTimer(() => {
      this._openTimer = null;
      if (task === this.task && this.state === 'connecting') this._lost(task, 1006, 'open timeout');
    }, this.openMs);
    task.onOpen(() => {
      if (task !== this.task) return;
      this.attempt = 0;
      this.policyCloses = 0;
      this.lastError = null;
      this._lastRx = this.now();
      this._set('open');
      this._startBeat(task);
      this.onOpen();
    });
    task.onMessage((msg) => {
      if (task !== this.task) return;
      this._lastRx = this.now();
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch (e) {
        return;
      }
      if (frame && frame.type === 'pong') return;
      this.onFrame(frame);
    });
    task.onError(() => {
      // onClose follows (or not, on some clients): treat an error as the end of this socket
      if (task !== this.task) return;
      this._lost(task, 1006, 'error');
    });
    task.onClose((res) => {
      if (task !== this.task) return;
      this._lost(task, res && res.code, res && res.reason);
    });
  }

  _lost(task, code, reason) {
    this.task = null;
    this._stopBeat();
    try { task.close({ code: 1000 }); } catch (e) { /* already closed */ }
    if (code === CLOSE_REVOKED) {
      this.api.dropSession(); // the next wsTicket() signs in anew (wx.login)
      this.attempt = 0;
      this._scheduleRetry({ code: 'revoked' }, 0);
      return;
    }
    if (code === CLOSE_POLICY || (code >= 4000 && code < 5000)) {
      this.policyCloses++;
      if (this.policyCloses >= this.maxPolicyCloses) {
        this._gen++;
        this._set('failed', { code, reason });
        return;
      }
    }
    this._scheduleRetry({ code: 'closed', close: code, reason });
  }

  // Wait (backoff with full jitter) and connect again. `fixed`: this delay instead.
  _scheduleRetry(why, fixed) {
    if (why && (why.code === 'network' || why.code === 'timeout' || why.status === 0 || why.status >= 500
      || why.status === 429)) {
      // the edge or the network: just wait
    } else if (why && why.status && why.status >= 400 && why.status < 500) {
      // a refused sign-in (e.g. mp_user_blocked): counts as a policy failure
      this.policyCloses++;
      if (this.policyCloses >= this.maxPolicyCloses) {
        this._gen++;
        this._set('failed', { code: why.code, message: why.message });
        return;
      }
    }
    const delay = fixed !== undefined ? fixed : this._backoff();
    const gen = this._gen;
    this._set('waiting', { delay, error: why || null });
    this._retry = this.setTimer(() => {
      this._retry = null;
      if (gen === this._gen) this._connect();
    }, delay);
  }

  _backoff() {
    const ceil = Math.min(this.maxMs, this.baseMs * Math.pow(2, this.attempt));
    this.attempt++;
    const delay = Math.max(this.minMs, Math.floor(this.random() * ceil));
    this.delays.push(delay);
    return delay;
  }

  _clearRetry() {
    if (this._retry !== null) this.clearTimer(this._retry);
    this._retry = null;
  }

  _startBeat(task) {
    this._stopBeat();
    const tick = () => {
      this._beat = null;
      if (task !== this.task) return;
      if (this.now() - this._lastRx > this.deadMs) {
        this._dead();
        return;
      }
      try { task.send({ data: JSON.stringify({ type: 'ping' }) }); } catch (e) { /* onClose follows */ }
      this._beat = this.setTimer(tick, this.heartbeatMs);
    };
    this._beat = this.setTimer(tick, this.heartbeatMs);
  }

  _stopBeat() {
    if (this._beat !== null && this._beat !== undefined) this.clearTimer(this._beat);
    this._beat = null;
    if (this._openTimer !== null) this.clearTimer(this._openTimer);
    this._openTimer = null;
    if (this._probeTimer !== null) this.clearTimer(this._probeTimer);
    this._probeTimer = null;
  }

  // Ping now; if nothing at all arrives within probeMs, the socket is dead (timers do not run in the
  // background, so the heartbeat alone would notice only much later).
  _probe() {
    const task = this.task;
    if (!task || this._probeTimer !== null) return;
    const sentAt = this.now();
    try { task.send({ data: JSON.stringify({ type: 'ping' }) }); } catch (e) { /* onClose follows */ }
    this._probeTimer = this.setTimer(() => {
      this._probeTimer = null;
      if (task === this.task && this._lastRx < sentAt) this._dead();
    }, this.probeMs);
  }

  // The socket is silent for too long: drop it and connect again at once.
  _dead() {
    const task = this.task;
    this.task = null;
    this._stopBeat();
    if (task) {
      try { task.close({ code: 1000, reason: 'heartbeat' }); } catch (e) { /* gone already */ }
    }
    this.attempt = 0;
    this._connect();
  }

  _closeTask(code, reason) {
    const task = this.task;
    this.task = null;
    if (task) {
      try { task.close({ code, reason }); } catch (e) { /* gone already */ }
    }
  }
}

module.exports = { SocketClient, CLOSE_REVOKED, CLOSE_POLICY };
