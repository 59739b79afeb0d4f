// The edge's HTTP API over `wx.request`, and the session: sign-in with `wx.login` -> POST /api/login {code}
// (or {dev_user} against a demo edge, config.js `devUser`), the access token kept in memory only, the refresh
// token (one use, rotated) in wx storage. The access token is renewed with POST /api/refresh shortly before it
// expires and after a 401 (once); a refused refresh (401 refresh_invalid) means a fresh wx.login.
//
// Every failure is an ApiError {status, code, message}: `message` is Simplified Chinese for the user — the
// edge's own `error.message` when it sent one, else the text for the code below.

'use strict';

const REFRESH_KEY = 'claw_refresh';
const UID_KEY = 'claw_uid';
const RENEW_BEFORE_S = 60; // renew the access token this long before it expires

// Chinese messages for the edge's error codes (used when the edge sent no message) and for local failures.
const MESSAGES = {
  missing_code: '登录凭证缺失，请重新打开小程序',
  bad_code: '登录凭证格式不正确，请重新打开小程序',
  mp_bad_code: '登录凭证无效或已过期，请重新登录',
  mp_user_blocked: '该微信账号暂时无法登录（被微信判定为高风险）',
  mp_rate_limited: '登录过于频繁，请一分钟后再试',
  mp_busy: '微信服务繁忙，请稍后再试',
  mp_error: '微信登录失败，请稍后再试',
  mp_unreachable: '服务器暂时连不上微信，请稍后再试',
  mp_bad_answer: '微信返回了无法识别的应答，请稍后再试',
  miniapp_login_unavailable: '服务器尚未配置小程序登录（[miniapp] appid/secret），请联系管理员',
  dev_login_disabled: '服务器未启用开发登录，请清空 config.js 的 devUser 后使用微信登录',
  bad_user: '开发登录的用户名无效',
  refresh_invalid: '登录已过期，请重新登录',
  missing_refresh: '登录已过期，请重新登录',
  unauthorized: '登录已失效，请重新登录',
  too_many_tickets: '连接请求过于频繁，请稍后再试',
  auth_store: '服务器暂时无法保存登录状态，请稍后再试',
  bad_query: '请求参数有误',
  not_found: '没有找到该内容',
  too_large: '请求内容过大',
  wx_login_failed: '微信登录失败，请检查网络后重试',
  network: '无法连接服务器，请检查网络后重试',
  timeout: '连接服务器超时，请稍后再试',
  bad_answer: '服务器返回了无法识别的应答',
};

function statusMessage(status) {
  if (status === 429) return '请求过于频繁，请稍后再试';
  if (status === 401) return MESSAGES.unauthorized;
  if (status === 403) return '没有权限';
  if (status === 404) return MESSAGES.not_found;
  if (status >= 500) return '服务器暂时不可用，请稍后再试';
  return `请求失败（HTTP ${status}）`;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status; // 0: no HTTP answer (network, wx.login)
    this.code = code;
  }
}

// The ApiError for an HTTP answer that is not a success.
function errorFromResponse(status, data) {
  const e = data && typeof data === 'object' && data.error && typeof data.error === 'object' ? data.error : {};
  const code = typeof e.code === 'string' && e.code ? e.code : `http_${status}`;
  const message = typeof e.message === 'string' && e.message ? e.message : (MESSAGES[code] || statusMessage(status));
  return new ApiError(status, code, message);
}

class Api {
  // opts: wx, baseUrl ('https://edge.example.com'), devUser ('' = wx.login), now() -> ms, timeout (ms)
  constructor(opts) {
    this.wx = opts.wx;
    this.baseUrl = String(opts.baseUrl || '').replace(/\/+$/, '');
    this.devUser = opts.devUser || '';
    this.now = opts.now || (() => Date.now());
    this.timeout = opts.timeout || 15000;
    this.token = null; // access token: memory only
    this.expires = 0; // its expiry, Unix seconds
    this.uid = this._read(UID_KEY) || null;
    this._renewing = null;
    this.onSignedOut = null; // called when the session is gone for good (logout)
  }

  // ---- plain requests

  // {status, data} of a 2xx answer, else an ApiError. `auth`: send the access token (renewed as needed).
  request(method, path, body, auth) {
    if (auth) return this._authed(method, path, body);
    return this._raw(method, path, body, null);
  }

  _raw(method, path, body, token) {
    return new Promise((resolve, reject) => {
      const header = { 'Content-Type': 'application/json' };
      if (token) header.Authorization = 'Bearer ' + token;
      this.wx.request({
        url: this.baseUrl + path,
        method,
        data: body === undefined || body === null ? undefined : body,
        header,
        timeout: this.timeout,
        dataType: 'json',
        success: (res) => {
          const status = res.statusCode;
          if (status >= 200 && status < 300) resolve({ status, data: res.data });
          else reject(errorFromResponse(status, res.data));
        },
        fail: (err) => {
          const msg = err && err.errMsg ? String(err.errMsg) : '';
          const code = /timeout/i.test(msg) ? 'timeout' : 'network';
          reject(new ApiError(0, code, MESSAGES[code]));
        },
      });
    });
  }

  async _authed(method, path, body) {
    await this.ensureToken();
    try {
      return await this._raw(method, path, body, this.token);
    } catch (e) {
      if (e.status !== 401) throw e;
      await this.renew(true); // once: refresh (or a new login), then the request again
      return this._raw(method, path, body, this.token);
    }
  }

  // ---- the session

  get signedIn() {
    return !!(this.token || this._read(REFRESH_KEY));
  }

  // An access token that is good for RENEW_BEFORE_S more seconds (renewed or signed in if needed).
  async ensureToken() {
    if (this.token && this.expires - this.now() / 1000 > RENEW_BEFORE_S) return this.token;
    await this.renew(false);
    return this.token;
  }

  // Renew the access token: the refresh token if there is one, else (or if it is refused) a new login. One
  // renewal at a time: concurrent callers share it. `force`: renew even if the token looks valid (after a 401).
  renew(force) {
    if (this._renewing) return this._renewing;
    if (!force && this.token && this.expires - this.now() / 1000 > RENEW_BEFORE_S) return Promise.resolve();
    this._renewing = (async () => {
      try {
        const refresh = this._read(REFRESH_KEY);
        if (refresh) {
          try {
            this._keep((await this._raw('POST', '/api/refresh', { refresh }, null)).data);
            return;
          } catch (e) {
            if (e.status !== 401 && e.status !== 400) throw e; // network trouble: keep the refresh token
            this._forget();
          }
        }
        await this.login();
      } finally {
        this._renewing = null;
      }
    })();
    return this._renewing;
  }

  // A new sign-in: wx.login -> POST /api/login {code}; or {dev_user} when config.js names a dev user.
  async login() {
    let body;
    if (this.devUser) body = { dev_user: this.devUser };
    else body = { code: await this._wxLogin() };
    const res = await this._raw('POST', '/api/login', body, null);
    this._keep(res.data);
    return this.uid;
  }

  // Sign out: the refresh token is deleted at the edge (best effort) and here.
  async logout() {
    const refresh = this._read(REFRESH_KEY);
    this._forget();
    this.uid = null;
    this._remove(UID_KEY);
    if (refresh) {
      try {
        await this._raw('POST', '/api/logout', { refresh }, null);
      } catch (e) {
        // the session ends by itself; nothing the user can do about a failed logout call
      }
    }
    if (this.onSignedOut) this.onSignedOut();
  }

  // Forget the session after a revocation (WebSocket close 4401): the next call signs in again.
  dropSession() {
    this._forget();
  }

  _wxLogin() {
    return new Promise((resolve, reject) => {
      this.wx.login({
        timeout: this.timeout,
        success: (res) => {
          if (res && res.code) resolve(res.code);
          else reject(new ApiError(0, 'wx_login_failed', MESSAGES.wx_login_failed));
        },
        fail: () => reject(new ApiError(0, 'wx_login_failed', MESSAGES.wx_login_failed)),
      });
    });
  }

  _keep(data) {
    if (!data || typeof data.token !== 'string' || typeof data.refresh !== 'string') {
      throw new ApiError(0, 'bad_answer', MESSAGES.bad_answer);
    }
    this.token = data.token;
    this.expires = Number(data.expires) || 0;
    this._write(REFRESH_KEY, data.refresh);
    if (typeof data.uid === 'string') {
      this.uid = data.uid;
      this._write(UID_KEY, data.uid);
    }
  }

  _forget() {
    this.token = null;
    this.expires = 0;
    this._remove(REFRESH_KEY);
  }

  _read(key) {
    try { return this.wx.getStorageSync(key) || ''; } catch (e) { return ''; }
  }

  _write(key, value) {
    try { this.wx.setStorageSync(key, value); } catch (e) { /* storage full: the session lasts this run */ }
  }

  _remove(key) {
    try { this.wx.removeStorageSync(key); } catch (e) { /* nothing stored */ }
  }

  // ---- the edge's routes

  async loginOptions() {
    return (await this._raw('GET', '/api/login/options', null, null)).data || {};
  }

  async wsTicket() {
    const res = await this.request('POST', '/api/ws-ticket', {}, true);
    if (!res.data || typeof res.data.ticket !== 'string') throw new ApiError(0, 'bad_answer', MESSAGES.bad_answer);
    return res.data.ticket;
  }

  // One page of the user's tasks, newest first; `before`: the `ts` (ms) of the oldest task already shown.
  async tasks(before, limit) {
    let q = `?limit=${limit || 20}`;
    if (before) q += `&before=${encodeURIComponent(before)}`;
    const res = await this.request('GET', '/api/tasks' + q, null, true);
    return (res.data && Array.isArray(res.data.tasks)) ? res.data.tasks : [];
  }

  async task(id) {
    if (!/^[0-9a-f]{32}$/.test(String(id))) throw new ApiError(404, 'not_found', MESSAGES.not_found);
    return (await this.request('GET', '/api/tasks/' + id, null, true)).data;
  }

  // The WebSocket URL for a ticket: https -> wss, http -> ws (DevTools against a local demo).
  wsUrl(ticket) {
    return this.baseUrl.replace(/^http/, 'ws') + '/api/ws?ticket=' + encodeURIComponent(ticket);
  }
}

module.exports = { Api, ApiError, MESSAGES, errorFromResponse, REFRESH_KEY, UID_KEY };
