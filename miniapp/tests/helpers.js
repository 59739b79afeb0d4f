// Test doubles: a hand-driven clock with timers, a fake wx (request router, login, storage, connectSocket).
'use strict';

class Clock {
  constructor() {
    this.t = 0;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms || 0), fn });
      return id;
    };
    this.clearTimeout = (id) => { this.timers.delete(id); };
  }

  // Run every timer due up to now + ms, in time order (timers set by timers included).
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let best = null;
      for (const [id, tm] of this.timers) if (tm.at <= end && (!best || tm.at < best[1].at)) best = [id, tm];
      if (!best) break;
      this.timers.delete(best[0]);
      this.t = best[1].at;
      best[1].fn();
    }
    this.t = end;
  }

  pending() {
    return [...this.timers.values()].map((tm) => tm.at - this.t).sort((a, b) => a - b);
  }
}

class FakeSocketTask {
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    this.h = {};
  }
  onOpen(f) { this.h.open = f; }
  onMessage(f) { this.h.message = f; }
  onError(f) { this.h.error = f; }
  onClose(f) { this.h.close = f; }
  send(o) {
    if (this.closed) throw new Error('closed');
    this.sent.push(JSON.parse(o.data));
  }
  close(o) { if (!this.closed) this.closed = o || {}; }
  // the server side
  open() { this.h.open(); }
  frame(f) { this.h.message({ data: JSON.stringify(f) }); }
  serverClose(code, reason) { this.closed = this.closed || { code }; this.h.close({ code, reason: reason || '' }); }
  frames(type) { return this.sent.filter((f) => !type || f.type === type); }
}

// routes: {'POST /api/login': (req) => [status, data] | 'fail'}
function fakeWx(routes) {
  const storage = new Map();
  const wx = {
    requests: [],
    sockets: [],
    logins: 0,
    loginCode: () => 'code' + wx.logins,
    routes: routes || {},
    request(o) {
      const key = `${o.method} ${o.url.replace(/^https?:\/\/[^/]+/, '').split('?')[0]}`;
      wx.requests.push({ key, url: o.url, data: o.data, header: o.header });
      const h = wx.routes[key];
      Promise.resolve().then(() => {
        if (!h) { o.success({ statusCode: 404, data: { error: { code: 'not_found', message: '没有' } } }); return; }
        const r = h(o);
        if (r === 'fail') o.fail({ errMsg: 'request:fail' });
        else o.success({ statusCode: r[0], data: r[1] });
      });
    },
    login(o) {
      wx.logins++;
      Promise.resolve().then(() => o.success({ code: wx.loginCode() }));
    },
    connectSocket(o) {
      const t = new FakeSocketTask(o.url);
      wx.sockets.push(t);
      return t;
    },
    getStorageSync: (k) => (storage.has(k) ? storage.get(k) : ''),
    setStorageSync: (k, v) => { storage.set(k, v); },
    removeStorageSync: (k) => { storage.delete(k); },
    storage,
    keys: (key) => wx.requests.filter((r) => r.key === key),
  };
  return wx;
}

// Let the promise chains (fake wx.request answers, async functions) run.
async function settle(n) {
  for (let i = 0; i < (n || 20); i++) await Promise.resolve();
}

// An edge that signs in and hands out tickets; tokens t1, t2, ...; refresh r1, r2, ...
function edgeRoutes(nowS) {
  let n = 0;
  const pair = () => {
    n++;
    return [200, { token: 't' + n, uid: 'mp.oUser1234567890abcdef', expires: nowS() + 900, refresh: 'r' + n,
      refresh_expires: nowS() + 7 * 86400 }];
  };
  let tickets = 0;
  return {
    'POST /api/login': () => pair(),
    'POST /api/refresh': () => pair(),
    'POST /api/logout': () => [200, { ok: true }],
    'POST /api/ws-ticket': () => [200, { ticket: 'k' + (++tickets), expires: 30 }],
    'GET /api/login/options': () => [200, { dev: false, wecom: false, miniapp: true, max_question: 8000 }],
  };
}

// Apply a setData object to plain data the way setData does: keys are paths such as `messages[1].blocks[2]`.
function applyUpdate(data, update) {
  for (const [path, value] of Object.entries(update)) {
    const keys = path.replace(/\[(\d+)\]/g, '.$1').split('.');
    let o = data;
    for (let i = 0; i < keys.length - 1; i++) {
      if (o[keys[i]] === undefined) o[keys[i]] = /^\d+$/.test(keys[i + 1]) ? [] : {};
      o = o[keys[i]];
    }
    o[keys[keys.length - 1]] = value;
  }
  return data;
}

module.exports = { Clock, FakeSocketTask, fakeWx, settle, edgeRoutes, applyUpdate };
