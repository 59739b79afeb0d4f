// utils/socket.js and utils/api.js against a mocked wx.connectSocket / wx.request / wx.login: backoff with
// jitter, capped and reset on open; one socket at a time; heartbeat; resume after a reconnect and on onShow;
// 401 -> refresh -> retry; refused refresh -> wx.login; close 4401 -> a new sign-in.
const { Api } = require('../utils/api');
const { SocketClient } = require('../utils/socket');
const { createClient } = require('../utils/client');
const { Clock, fakeWx, settle, edgeRoutes, applyUpdate } = require('./helpers');

function setup(opts) {
  const o = opts || {};
  const clock = new Clock();
  const nowS = () => Math.floor(clock.now() / 1000) + 1700000000;
  const wx = fakeWx(edgeRoutes(nowS));
  const api = new Api({ wx, baseUrl: 'https://edge.example.com', now: () => nowS() * 1000 });
  const frames = [];
  let opens = 0;
  const sock = new SocketClient({ wx, api, random: o.random || (() => 1), setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout, now: clock.now, baseMs: 500, maxMs: 8000, minMs: 0, heartbeatMs: 20000,
    deadMs: 45000, onFrame: (f) => frames.push(f), onOpen: () => opens++ });
  return { clock, wx, api, sock, frames, opens: () => opens };
}

async function connected(s) {
  s.sock.start();
  await settle();
  const t = s.wx.sockets[s.wx.sockets.length - 1];
  t.open();
  return t;
}

test('connect: sign in with wx.login, a ticket, one socket to wss://…/api/ws?ticket=', async () => {
  const s = setup();
  const t = await connected(s);
  expect(s.wx.logins).toBe(1);
  expect(s.wx.keys('POST /api/login')[0].data).toEqual({ code: 'code1' });
  expect(s.wx.keys('POST /api/ws-ticket')[0].header.Authorization).toBe('Bearer t1');
  expect(t.url).toBe('wss://edge.example.com/api/ws?ticket=k1');
  expect(s.sock.state).toBe('open');
  expect(s.opens()).toBe(1);
  expect(s.wx.storage.get('claw_refresh')).toBe('r1');
  expect(s.api.token).toBe('t1'); // memory only
  expect([...s.wx.storage.values()]).not.toContain('t1');
  t.frame({ type: 'node', online: true });
  t.frame({ type: 'pong' });
  expect(s.frames).toEqual([{ type: 'node', online: true }]);
});

test('backoff grows with full jitter, is capped, and resets after an open', async () => {
  let r = 1;
  const s = setup({ random: () => r });
  await connected(s);
  const ceilings = [];
  for (let i = 0; i < 7; i++) {
    s.wx.sockets[s.wx.sockets.length - 1].serverClose(1006);
    ceilings.push(s.clock.pending()[0]);
    s.clock.advance(s.clock.pending()[0]);
    await settle();
  }
  expect(ceilings).toEqual([500, 1000, 2000, 4000, 8000, 8000, 8000]); // random() = 1: the ceiling, capped
  expect(s.wx.sockets.length).toBe(8);
  r = 0.25; // jitter: a fraction of the ceiling
  s.wx.sockets[7].serverClose(1006);
  expect(s.clock.pending()[0]).toBe(2000);
  s.clock.advance(2000);
  await settle();
  s.wx.sockets[8].open(); // reset
  s.wx.sockets[8].serverClose(1006);
  expect(s.clock.pending()[0]).toBe(125);
  expect(s.sock.state).toBe('waiting');
});

test('a failed ticket request (edge down) is retried with backoff too', async () => {
  const s = setup();
  s.wx.routes['POST /api/ws-ticket'] = () => 'fail';
  s.sock.start();
  await settle();
  expect(s.sock.state).toBe('waiting');
  expect(s.sock.lastError.message).toBe('无法连接服务器，请检查网络后重试');
  expect(s.clock.pending()).toEqual([500]);
  s.wx.routes['POST /api/ws-ticket'] = () => [200, { ticket: 'k9' }];
  s.clock.advance(500);
  await settle();
  expect(s.wx.sockets.length).toBe(1);
});

test('at most one socket: a new connect closes the old task and ignores its events', async () => {
  const s = setup();
  const old = await connected(s);
  s.sock.state = 'waiting'; // e.g. onShow decided to reconnect
  s.sock.foreground();
  await settle();
  expect(old.closed).toBeTruthy();
  expect(s.wx.sockets.length).toBe(2);
  const cur = s.wx.sockets[1];
  cur.open();
  old.frame({ type: 'delta', task: 'x', seq: 1, text: 'stale' });
  old.serverClose(1006);
  expect(s.frames).toEqual([]);
  expect(s.sock.state).toBe('open');
  expect(s.clock.pending()).toEqual([20000]); // only the heartbeat, no reconnect scheduled
  // and start() while open or connecting does nothing
  s.sock.start();
  await settle();
  expect(s.wx.sockets.length).toBe(2);
});

test('start() twice while the ticket is on its way opens one socket', async () => {
  const s = setup();
  s.sock.start();
  s.sock.start();
  await settle();
  expect(s.wx.sockets.length).toBe(1);
});

test('heartbeat: a ping every 20 s; a socket silent for 45 s is replaced', async () => {
  const s = setup();
  const t = await connected(s);
  s.clock.advance(20000);
  expect(t.frames('ping').length).toBe(1);
  t.frame({ type: 'pong' });
  s.clock.advance(20000);
  expect(t.frames('ping').length).toBe(2);
  s.clock.advance(40000); // no answer since the pong at 20 s
  await settle();
  expect(t.closed).toBeTruthy();
  expect(s.wx.sockets.length).toBe(2);
});

test('foreground with an open socket: a ping at once; no answer within 5 s means dead', async () => {
  const s = setup();
  const t = await connected(s);
  s.clock.advance(1000);
  expect(s.sock.foreground()).toBe(true); // back from the background: probe it
  expect(t.sent[t.sent.length - 1]).toEqual({ type: 'ping' });
  t.frame({ type: 'pong' });
  s.clock.advance(5000);
  expect(s.wx.sockets.length).toBe(1); // answered: kept
  expect(s.sock.foreground()).toBe(true);
  s.clock.advance(5000); // this time no answer
  await settle();
  expect(t.closed).toBeTruthy();
  expect(s.wx.sockets.length).toBe(2);
});

test('close 4401: the session is dropped and a new wx.login made before reconnecting', async () => {
  const s = setup();
  const t = await connected(s);
  t.serverClose(4401, 'token revoked');
  expect(s.api.token).toBeNull();
  expect(s.wx.storage.has('claw_refresh')).toBe(false);
  s.clock.advance(0);
  await settle();
  expect(s.wx.logins).toBe(2);
  expect(s.wx.keys('POST /api/refresh').length).toBe(0);
  expect(s.wx.sockets[1].url).toBe('wss://edge.example.com/api/ws?ticket=k2');
});

test('policy closes (1008, 4xxx) retry with backoff, then give up until start()', async () => {
  const s = setup();
  await connected(s);
  for (let i = 0; i < 5; i++) {
    s.wx.sockets[s.wx.sockets.length - 1].serverClose(i % 2 ? 1008 : 4000);
    if (i < 4) {
      s.clock.advance(s.clock.pending()[0]);
      await settle();
    }
  }
  expect(s.sock.state).toBe('failed');
  expect(s.clock.pending()).toEqual([]);
  s.sock.start();
  await settle();
  expect(s.wx.sockets.length).toBe(6);
});

test('stop() closes the socket and cancels the reconnect', async () => {
  const s = setup();
  const t = await connected(s);
  t.serverClose(1006);
  s.sock.stop();
  s.clock.advance(60000);
  await settle();
  expect(s.wx.sockets.length).toBe(1);
  expect(s.sock.state).toBe('idle');
});

describe('api session', () => {
  test('401 on a request: refresh, then the request again with the new token', async () => {
    const s = setup();
    await s.api.login();
    let first = true;
    s.wx.routes['GET /api/tasks'] = (o) => {
      if (first) { first = false; return [401, { error: { code: 'unauthorized', message: '未登录' } }]; }
      return [200, { tasks: [{ task: 'a'.repeat(32), auth: o.header.Authorization }] }];
    };
    const tasks = await s.api.tasks();
    expect(tasks[0].auth).toBe('Bearer t2');
    expect(s.wx.keys('POST /api/refresh')[0].data).toEqual({ refresh: 'r1' });
    expect(s.wx.logins).toBe(1);
    expect(s.wx.storage.get('claw_refresh')).toBe('r2');
  });

  test('a refused refresh (401 refresh_invalid) means wx.login again', async () => {
    const s = setup();
    await s.api.login();
    s.wx.routes['POST /api/refresh'] = () => [401, { error: { code: 'refresh_invalid', message: '登录已失效' } }];
    let first = true;
    s.wx.routes['GET /api/tasks'] = (o) => {
      if (first) { first = false; return [401, { error: { code: 'unauthorized' } }]; }
      return [200, { tasks: [{ auth: o.header.Authorization }] }];
    };
    const tasks = await s.api.tasks();
    expect(s.wx.logins).toBe(2);
    expect(tasks[0].auth).toBe('Bearer t2');
  });

  test('a second 401 is an error (no loop)', async () => {
    const s = setup();
    await s.api.login();
    s.wx.routes['GET /api/tasks'] = () => [401, { error: { code: 'unauthorized', message: '登录已失效，请重新登录' } }];
    await expect(s.api.tasks()).rejects.toMatchObject({ status: 401, code: 'unauthorized' });
    expect(s.wx.keys('GET /api/tasks').length).toBe(2);
  });

  test('the token is renewed shortly before it expires, and concurrent callers share one renewal', async () => {
    const s = setup();
    await s.api.login();
    s.clock.advance(800 * 1000); // 100 s left
    expect(await s.api.ensureToken()).toBe('t1');
    s.clock.advance(50 * 1000); // 50 s left: under a minute
    const [a, b] = await Promise.all([s.api.ensureToken(), s.api.ensureToken()]);
    expect([a, b]).toEqual(['t2', 't2']);
    expect(s.wx.keys('POST /api/refresh').length).toBe(1);
  });

  test('a refresh that fails on the network keeps the refresh token', async () => {
    const s = setup();
    await s.api.login();
    s.wx.routes['POST /api/refresh'] = () => 'fail';
    await expect(s.api.renew(true)).rejects.toMatchObject({ code: 'network' });
    expect(s.wx.storage.get('claw_refresh')).toBe('r1');
    expect(s.wx.logins).toBe(1);
  });

  test.each([
    [401, 'mp_bad_code', '登录凭证无效或已过期，请重新打开小程序登录'],
    [429, 'mp_rate_limited', '登录过于频繁，请一分钟后再试'],
    [503, 'mp_busy', '微信服务繁忙，请稍后再试'],
    [502, 'mp_unreachable', '无法连接微信服务器，请稍后再试'],
    [501, 'miniapp_login_unavailable', '小程序登录未配置'],
  ])('login error %i %s: the edge\'s own message', async (status, code, message) => {
    const s = setup();
    s.wx.routes['POST /api/login'] = () => [status, { error: { code, message } }];
    await expect(s.api.login()).rejects.toMatchObject({ status, code, message });
  });

  test.each([
    [401, 'mp_bad_code', '登录凭证无效或已过期，请重新登录'],
    [403, 'mp_user_blocked', '该微信账号暂时无法登录（被微信判定为高风险）'],
    [429, 'mp_rate_limited', '登录过于频繁，请一分钟后再试'],
    [503, 'mp_busy', '微信服务繁忙，请稍后再试'],
    [502, 'mp_error', '微信登录失败，请稍后再试'],
    [504, 'mp_unreachable', '服务器暂时连不上微信，请稍后再试'],
    [502, 'mp_bad_answer', '微信返回了无法识别的应答，请稍后再试'],
    [501, 'miniapp_login_unavailable', '服务器尚未配置小程序登录（[miniapp] appid/secret），请联系管理员'],
    [400, 'missing_code', '登录凭证缺失，请重新打开小程序'],
    [400, 'bad_code', '登录凭证格式不正确，请重新打开小程序'],
    [418, 'http_418', '请求失败（HTTP 418）'],
    [500, 'http_500', '服务器暂时不可用，请稍后再试'],
  ])('login error %i %s without a message: a Chinese one from the code', async (status, code, message) => {
    const s = setup();
    s.wx.routes['POST /api/login'] = () => [status, code.startsWith('http_') ? 'oops' : { error: { code } }];
    await expect(s.api.login()).rejects.toMatchObject({ status, code, message });
  });

  test('wx.login failing and the edge unreachable have their own messages', async () => {
    const s = setup();
    s.wx.login = (o) => o.fail({ errMsg: 'login:fail' });
    await expect(s.api.login()).rejects.toMatchObject({ code: 'wx_login_failed', message: '微信登录失败，请检查网络后重试' });
    const t = setup();
    t.wx.routes['POST /api/login'] = () => 'fail';
    await expect(t.api.login()).rejects.toMatchObject({ code: 'network', message: '无法连接服务器，请检查网络后重试' });
  });

  test('dev login: config devUser signs in with {dev_user} instead of wx.login', async () => {
    const s = setup();
    const api = new Api({ wx: s.wx, baseUrl: 'http://127.0.0.1:8080', devUser: 'alice' });
    await api.login();
    expect(s.wx.logins).toBe(0);
    expect(s.wx.keys('POST /api/login')[0].data).toEqual({ dev_user: 'alice' });
    expect(api.wsUrl('k')).toBe('ws://127.0.0.1:8080/api/ws?ticket=k');
  });

  test('logout deletes the refresh token here and at the edge', async () => {
    const s = setup();
    await s.api.login();
    await s.api.logout();
    expect(s.wx.keys('POST /api/logout')[0].data).toEqual({ refresh: 'r1' });
    expect(s.wx.storage.has('claw_refresh')).toBe(false);
    expect(s.api.token).toBeNull();
    expect(s.api.signedIn).toBe(false);
  });
});

describe('client: socket + chat + throttle', () => {
  function client() {
    const clock = new Clock();
    const nowS = () => Math.floor(clock.now() / 1000) + 1700000000;
    const wx = fakeWx(edgeRoutes(nowS));
    let n = 0;
    const c = createClient({ wx, baseUrl: 'https://edge.example.com', random: () => 1, now: clock.now,
      setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
      newId: () => (++n).toString(16).padStart(32, '0') });
    const updates = [];
    c.subscribe((u) => updates.push(u));
    return { clock, wx, c, updates };
  }

  test('resume frames after a reconnect and on onShow; nothing lost or repeated', async () => {
    const { clock, wx, c, updates } = client();
    await c.start();
    await settle();
    const s1 = wx.sockets[0];
    s1.open();
    const r = c.ask('写一首诗');
    const task = r.frame.id;
    expect(s1.frames('ask')).toEqual([r.frame]);
    s1.frame({ type: 'accepted', task, queue: 0 });
    s1.frame({ type: 'delta', task, seq: 1, text: '春眠' });
    s1.frame({ type: 'delta', task, seq: 2, text: '不觉晓，' });
    s1.serverClose(1006); // the network drops
    clock.advance(1000); // the backoff (500 ms with random() = 1)
    await settle();
    const s2 = wx.sockets[1];
    s2.open();
    expect(s2.frames()).toEqual([{ type: 'resume', task, seq: 2 }]);
    s2.frame({ type: 'delta', task, seq: 2, text: '不觉晓，' }); // overlap: dropped
    s2.frame({ type: 'delta', task, seq: 3, text: '处处' });
    // the app goes to the background and comes back: resume on the open socket
    c.foreground();
    expect(s2.frames('resume')).toEqual([{ type: 'resume', task, seq: 2 }, { type: 'resume', task, seq: 3 }]);
    s2.frame({ type: 'delta', task, seq: 3, text: '处处' }); // the replay of the resume: dropped
    s2.frame({ type: 'delta', task, seq: 4, text: '闻啼鸟。' });
    s2.frame({ type: 'done', task, seq: 4, status: 'ok', text: '春眠不觉晓，处处闻啼鸟。' });
    const data = {};
    updates.forEach((u) => applyUpdate(data, u));
    expect(data.messages[1]).toMatchObject({ state: 'done', text: '春眠不觉晓，处处闻啼鸟。' });
    const msg = c.chat.messages[1];
    expect(msg.text).toBe('春眠不觉晓，处处闻啼鸟。');
    expect(c.chat.duplicates).toBe(2);
  });

  test('onShow with a dead socket reconnects at once (no backoff wait) and resumes there', async () => {
    const { clock, wx, c } = client();
    await c.start();
    await settle();
    wx.sockets[0].open();
    const { frame } = c.ask('问');
    wx.sockets[0].frame({ type: 'accepted', task: frame.id, queue: 0 });
    wx.sockets[0].frame({ type: 'delta', task: frame.id, seq: 1, text: 'a' });
    wx.sockets[0].serverClose(1006); // killed in the background; a backoff timer waits
    expect(c.socket.state).toBe('waiting');
    c.foreground();
    await settle();
    expect(wx.sockets.length).toBe(2);
    wx.sockets[1].open();
    expect(wx.sockets[1].frames()).toEqual([{ type: 'resume', task: frame.id, seq: 1 }]);
    clock.advance(60000);
    expect(wx.sockets.length).toBe(2);
  });

  test('a question asked while disconnected is sent once the socket opens', async () => {
    const { wx, c } = client();
    await c.start();
    const { frame } = c.ask('离线时的问题');
    await settle();
    wx.sockets[0].open();
    expect(wx.sockets[0].frames()).toEqual([frame]);
  });

  test('many deltas make few setData updates (throttled to 4 a second)', async () => {
    const { clock, wx, c, updates } = client();
    await c.start();
    await settle();
    wx.sockets[0].open();
    clock.advance(300);
    const { frame } = c.ask('长回答');
    const before = updates.length;
    for (let s = 1; s <= 400; s++) {
      wx.sockets[0].frame({ type: 'delta', task: frame.id, seq: s, text: 'x' });
      clock.advance(5); // 200 deltas a second for 2 s
    }
    clock.advance(500);
    const n = updates.length - before;
    expect(n).toBeGreaterThanOrEqual(7);
    expect(n).toBeLessThanOrEqual(11);
    expect(c.chat.messages[1].text).toBe('x'.repeat(400));
  });

  test('stop from the page sends stop; logout closes the socket and forgets the session', async () => {
    const { wx, c } = client();
    await c.start();
    await settle();
    wx.sockets[0].open();
    const r = c.ask('问');
    wx.sockets[0].frame({ type: 'accepted', task: r.frame.id, queue: 0 });
    c.stop(r.key);
    expect(wx.sockets[0].frames('stop')).toEqual([{ type: 'stop', task: r.frame.id }]);
    await c.logout();
    expect(wx.sockets[0].closed).toBeTruthy();
    expect(c.socket.state).toBe('idle');
    expect(wx.storage.has('claw_refresh')).toBe(false);
    expect(c.chat.messages).toEqual([]);
    c.foreground(); // back from the background after 退出登录: stays signed out
    await settle();
    expect(wx.sockets.length).toBe(1);
    expect(wx.logins).toBe(1);
  });

  test('max_question from /api/login/options; 8000 when the call fails', async () => {
    const a = client();
    a.wx.routes['GET /api/login/options'] = () => [200, { max_question: 100 }];
    await a.c.start();
    expect(a.c.chat.maxQuestion).toBe(100);
    expect(a.c.ask('x'.repeat(101)).ok).toBe(false);
    const b = client();
    b.wx.routes['GET /api/login/options'] = () => [404, {}];
    await b.c.start();
    expect(b.c.chat.maxQuestion).toBe(8000);
  });
});

describe('a connect that never opens', () => {
  test('connectSocket reporting only to fail (not in the socket whitelist): retried with backoff', async () => {
    const s = setup();
    const real = s.wx.connectSocket;
    let fails = 0;
    s.wx.connectSocket = (o) => {
      const t = real(o);
      if (fails++ === 0) Promise.resolve().then(() => o.fail && o.fail({ errMsg: 'connectSocket:fail url not in domain list' }));
      return t;
    };
    s.sock.start();
    await settle();
    expect(s.sock.state).toBe('waiting');
    expect(s.wx.sockets[0].closed).toEqual({ code: 1000 });
    s.clock.advance(s.clock.pending()[0]);
    await settle();
    s.wx.sockets[1].open();
    expect(s.sock.state).toBe('open');
  });

  test('fail called at once, inside connectSocket', async () => {
    const s = setup();
    const real = s.wx.connectSocket;
    s.wx.connectSocket = (o) => { const t = real(o); if (o.fail) o.fail({ errMsg: 'connectSocket:fail' }); return t; };
    s.sock.start();
    await settle();
    expect(s.sock.state).toBe('waiting');
  });

  test('a handshake with no event at all is given up after 15 s', async () => {
    const s = setup();
    s.sock.start();
    await settle();
    expect(s.sock.state).toBe('connecting');
    s.clock.advance(15000);
    expect(s.sock.state).toBe('waiting');
    s.clock.advance(s.clock.pending()[0]);
    await settle();
    expect(s.wx.sockets.length).toBe(2);
    s.wx.sockets[1].open();
    expect(s.sock.state).toBe('open');
    s.clock.advance(16000); // the old watchdog is gone: nothing closes the open socket
    expect(s.sock.state).toBe('open');
  });
});
