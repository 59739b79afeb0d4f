// The chat page. Sign-in (GET /api/login/options), history (GET /api/tasks), one WebSocket with
// resume, and a throttled Markdown rendering of the answers. docs/web.md describes the behaviour.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const md = window.ClawMarkdown;

  const LS_REFRESH = "claw_refresh";  // the refresh token (one use, rotated on every renewal)
  const LS_CONV = "claw_conv";        // the current conversation id (新对话 starts another)
  const SS_WECOM = "claw_wecom_redirect";  // when this tab last went to /auth/wecom (no redirect loop)
  const SS_LOGGED_OUT = "claw_logged_out"; // 退出 was pressed in this tab: no automatic WeCom sign-in
  const DEFAULT_MAX_QUESTION = 8000;
  const MAX_FRAME_BYTES = 60 * 1024;   // the edge takes WebSocket frames up to 64 KiB
  const HISTORY = 30;                  // tasks shown after a reload
  const BACKOFF_MIN = 500, BACKOFF_MAX = 15000;
  const RENDER_EVERY_MS = 100;         // at most 10 renders a second while an answer streams

  const LOGIN_ERRORS = {
    wecom_state: "登录已过期或无法验证请求来源，请从企业微信工作台重新打开「智控未来」。",
    wecom_bad_code: "企业微信登录凭证无效或已过期，请重新打开页面。",
    wecom_not_member: "你不是本企业的成员（或没有使用本应用的权限），无法登录。如需使用请联系管理员。",
    wecom_busy: "企业微信繁忙，请稍后重试。",
    wecom_unreachable: "服务器暂时无法连接企业微信，请稍后重试。",
    wecom_error: "企业微信登录失败，请稍后重试或联系管理员。",
  };

  let opts = {dev: false, wecom: false, miniapp: false, max_question: DEFAULT_MAX_QUESTION};
  let token = null, expires = 0, uid = null;
  let signedIn = false, sessionGen = 0;
  let ws = null, wsOpenedAt = 0, connGen = 0, retry = 0, reconnectTimer = null, nodeOnline = true;
  let connMsg = "", connKind = "", lastFrameAt = 0;
  const PING_EVERY_MS = 25000, SILENT_MS = 60000;  // a socket silent this long (pings unanswered) is dead
  const tasks = new Map();    // task id -> answer bubble {el, body, meta, text, seq, done, status, user}
  const outbox = new Map();   // ask id -> {json, el}: asked, not acknowledged by the edge yet
  const stopWanted = new Set();
  let conv = localStorage.getItem(LS_CONV) || newConv();

  // ---- small helpers ---------------------------------------------------------------------------
  function randomHex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function newConv() {
    const c = "web-" + randomHex(8);
    localStorage.setItem(LS_CONV, c);
    return c;
  }
  function codePoints(s) {  // what the edge counts (Python characters), not UTF-16 units
    let n = s.length;
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
        const d = s.charCodeAt(i + 1);
        if (d >= 0xdc00 && d <= 0xdfff) { n--; i++; }
      }
    }
    return n;
  }
  function setStatus(text, kind) {
    $("status").textContent = text;
    $("status").className = kind || "";
  }
  function showStatus() {  // the connection's state, with the node's and the user's
    if (!signedIn) return;
    $("retryBtn").hidden = !reconnectTimer;
    if (ws && ws.readyState === WebSocket.OPEN) {
      if (!nodeOnline) setStatus("已连接 · 助手离线：问题会排队，上线后自动回答", "warn");
      else setStatus("已连接 · " + uid, "ok");
    } else {
      setStatus(connMsg || "正在连接…", connKind || "warn");
    }
  }
  function hint(text, kind) {
    $("hint").hidden = !text;
    $("hint").textContent = text || "";
    $("hint").className = kind || "";
  }

  class HttpError extends Error {
    constructor(status, body) { super("HTTP " + status); this.status = status; this.body = body; }
  }
  async function request(method, path, body, bearer) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (bearer) headers["Authorization"] = "Bearer " + bearer;
    const r = await fetch(path, {method, headers, cache: "no-store",
                                 body: body === undefined ? undefined : JSON.stringify(body)});
    let j = {};
    try { j = await r.json(); } catch (e) { /* not JSON */ }
    return {ok: r.ok, status: r.status, j};
  }
  const errMessage = (r, fallback) => (r.j && r.j.error && r.j.error.message) || fallback;

  // ---- tokens ----------------------------------------------------------------------------------
  // The access token (15 min) lives in memory, the refresh token in localStorage; renewals are made one at a
  // time (a refresh token is single-use: two renewals in parallel would sign the user out).
  function keep(j) {
    token = j.token;
    expires = j.expires;
    if (j.uid) uid = j.uid;
    localStorage.setItem(LS_REFRESH, j.refresh);
  }
  function forget() {
    token = null;
    expires = 0;
    localStorage.removeItem(LS_REFRESH);
  }
  let renewing = null;
  function renew() {
    if (!renewing) renewing = doRenew().finally(() => { renewing = null; });
    return renewing;
  }
  async function doRenew() {  // true: signed in; false: the session is gone; throws: the edge is unreachable
    const gen = sessionGen;
    for (let attempt = 0; attempt < 2; attempt++) {
      const refresh = localStorage.getItem(LS_REFRESH);
      if (!refresh) return false;
      const r = await request("POST", "/api/refresh", {refresh});
      if (gen !== sessionGen) return false;  // signed in anew meanwhile (登录): this answer is the old session's
      if (r.ok) { keep(r.j); return true; }
      if (r.status !== 401) throw new HttpError(r.status, r.j);
      if (localStorage.getItem(LS_REFRESH) !== refresh) continue;  // another tab renewed it meanwhile
      forget();
      return false;
    }
    return false;
  }
  async function accessToken() {
    if (token && Date.now() / 1000 < expires - 60) return token;
    token = null;
    return (await renew()) ? token : null;
  }
  async function api(path) {  // an authenticated GET; null when signed out
    for (let attempt = 0; attempt < 2; attempt++) {
      const t = await accessToken();
      if (!t) return null;
      const r = await request("GET", path, undefined, t);
      if (r.ok) return r.j;
      if (r.status !== 401) throw new HttpError(r.status, r.j);
      token = null;
    }
    return null;
  }
  async function ticket() {  // a one-time WebSocket ticket; null when signed out
    for (let attempt = 0; attempt < 2; attempt++) {
      const t = await accessToken();
      if (!t) return null;
      const r = await request("POST", "/api/ws-ticket", undefined, t);
      if (r.ok) return r.j.ticket;
      if (r.status !== 401) throw new HttpError(r.status, r.j);
      token = null;  // expired or revoked: renew once
    }
    return null;
  }

  // ---- the WebSocket: exactly one ---------------------------------------------------------------
  function dropSocket() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (ws) {
      const old = ws;
      ws = null;
      old.onopen = old.onmessage = old.onclose = old.onerror = null;
      try { old.close(1000, "bye"); } catch (e) { /* already closing */ }
    }
  }

  async function connect() {
    const gen = ++connGen;
    dropSocket();
    if (!signedIn) return;
    connMsg = "正在连接…";
    connKind = "warn";
    showStatus();
    let t;
    try {
      t = await ticket();
    } catch (e) {
      if (gen === connGen) reconnectLater(e.status === 429 ? "请求过于频繁" : "无法连接服务器");
      return;
    }
    if (gen !== connGen || !signedIn) return;
    if (!t) { signOut("登录已失效，请重新登录"); return; }
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const sock = new WebSocket(`${proto}://${location.host}/api/ws?ticket=${encodeURIComponent(t)}`);
    ws = sock;
    let opened = false;
    sock.onopen = () => {
      if (ws !== sock) return;
      opened = true;
      wsOpenedAt = lastFrameAt = Date.now();
      connMsg = "";
      showStatus();
      for (const [id, b] of tasks) {  // every unfinished answer continues after what it has
        if (!b.done) sock.send(JSON.stringify({type: "resume", task: id, seq: b.seq}));
      }
      for (const a of outbox.values()) { sock.send(a.json); meta(a.el, ""); }  // idempotent (the ask's id)
      for (const id of stopWanted) sock.send(JSON.stringify({type: "stop", task: id}));
      stopWanted.clear();
      updateButtons();
    };
    sock.onmessage = (ev) => {
      if (ws !== sock) return;
      lastFrameAt = Date.now();
      let f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(f);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      updateButtons();
      closed(ev, opened, gen);
    };
  }

  async function closed(ev, opened, gen) {
    if (ev.code === 4401) { forget(); signOut("登录已被撤销，请重新登录"); return; }
    if (!opened) {
      // A refused handshake: the browser hides its HTTP status, so ask the edge why with a plain GET.
      const why = await refusal();
      if (gen !== connGen || !signedIn) return;
      if (why === "signedout") { signOut("登录已失效，请重新登录"); return; }
      reconnectLater(why || "无法连接服务器");
      return;
    }
    if (Date.now() - wsOpenedAt > 10000) retry = 0;  // it had been up a while: start the backoff anew
    reconnectLater(ev.code === 1013 ? "网络太慢，连接被服务器断开" : ev.code === 1009 ? "消息过大，连接被服务器断开"
                   : "连接已断开");
  }

  async function refusal() {
    try {
      const t = await ticket();
      if (!t) return "signedout";
      const r = await request("GET", "/api/ws?ticket=" + encodeURIComponent(t));
      if (r.status === 429) {
        return "同一账号打开的连接过多（其他标签页或设备上也开着本页面）：请关闭不用的页面";
      }
      if (r.status === 401) { token = null; return ""; }
      if (r.status === 403) return errMessage(r, "服务器拒绝了连接");
      if (r.status >= 500) return "服务器暂时不可用";
      return "";
    } catch (e) {
      return "无法连接服务器";
    }
  }

  function reconnectLater(why) {
    if (!signedIn) return;
    clearTimeout(reconnectTimer);
    const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** Math.min(retry, 8));
    retry++;
    const delay = base / 2 + Math.random() * base / 2;  // jitter: many clients do not come back at once
    connMsg = `${why}，${Math.max(1, Math.round(delay / 1000))} 秒后自动重连…（输入的问题会在连接恢复后发送）`;
    connKind = "err";
    reconnectTimer = setTimeout(() => { reconnectTimer = null; connect(); }, delay);
    showStatus();
  }
  function connectNow() {  // 立即重连, back online, tab shown again
    if (signedIn && !ws && reconnectTimer) connect();
  }
  // A connection that died without a close (a phone changing networks) is noticed by its silence: the page
  // pings, the edge answers pong.
  setInterval(() => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastFrameAt > SILENT_MS) {
      dropSocket();
      updateButtons();
      reconnectLater("连接无响应");
      return;
    }
    ws.send(JSON.stringify({type: "ping"}));
  }, PING_EVERY_MS);

  // ---- the conversation view -------------------------------------------------------------------
  function nearBottom() {
    const log = $("log");
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }
  function scrollDown(force) {
    const log = $("log");
    if (force || nearBottom()) log.scrollTop = log.scrollHeight;
  }
  function add(cls, text, after) {
    const stick = nearBottom();
    const el = document.createElement("div");
    el.className = "msg " + cls;
    const body = document.createElement("div");
    body.className = cls.startsWith("bot") ? "body md" : "body";
    body.textContent = text;
    el.appendChild(body);
    if (after && after.parentNode === $("log")) after.after(el);
    else $("log").appendChild(el);
    if (stick) scrollDown(true);
    return el;
  }
  function meta(el, text) {
    let m = el.querySelector(".meta");
    if (!text) { if (m) m.remove(); return; }
    if (!m) { m = document.createElement("div"); m.className = "meta"; el.appendChild(m); }
    m.textContent = text;
  }
  function divider(text) {
    const d = document.createElement("div");
    d.className = "divider";
    d.textContent = text;
    $("log").appendChild(d);
  }
  function bubble(id, userEl) {
    let b = tasks.get(id);
    if (!b) {
      b = {id, el: add("bot", "", userEl), text: "", seq: 0, done: false, status: "", rendered: -1};
      b.el.dataset.task = id;
      tasks.set(id, b);
    }
    return b;
  }

  // Rendering: at most every RENDER_EVERY_MS while text streams in, in an animation frame.
  const dirty = new Set();
  let renderTimer = null, lastRender = 0;
  // md escapes every character of the text. While an answer streams, the part before the last safe cut
  // (markdown.js) is rendered once and only the rest again; the finished answer is rendered whole.
  function render(b) {
    if (b.rendered === b.text.length && b.renderedDone === b.done) return;
    const stick = nearBottom();
    const body = b.el.querySelector(".body");
    if (b.done) {
      body.innerHTML = md.render(b.text);
      b.tail = null;
    } else {
      if (!b.tail || b.tail.parentNode !== body) {
        body.textContent = "";
        b.tail = document.createElement("div");
        b.tail.className = "tail";
        body.appendChild(b.tail);
        b.stable = 0;
      }
      const cut = md.safeCut(b.text, b.stable);
      if (cut > b.stable) {
        b.tail.insertAdjacentHTML("beforebegin", md.render(b.text.slice(b.stable, cut)));
        b.stable = cut;
      }
      b.tail.innerHTML = md.render(b.text.slice(b.stable));
    }
    b.rendered = b.text.length;
    b.renderedDone = b.done;
    if (stick) scrollDown(true);
  }
  function schedule(b) {
    dirty.add(b);
    if (renderTimer) return;
    const wait = Math.max(0, RENDER_EVERY_MS - (performance.now() - lastRender));
    renderTimer = setTimeout(() => requestAnimationFrame(() => {
      renderTimer = null;
      lastRender = performance.now();
      for (const x of dirty) render(x);
      dirty.clear();
    }), wait);
  }
  function finish(b, f) {
    b.done = true;
    b.status = f.status;
    if (typeof f.text === "string") b.text = f.text;
    if (typeof f.seq === "number") b.seq = f.seq;
    dirty.delete(b);
    b.rendered = -1;
    render(b);
    b.el.classList.remove("error", "cancelled");
    if (f.status === "ok") {
      meta(b.el, f.usage && f.usage.completion_tokens ? `完成 · ${f.usage.completion_tokens} tokens` : "完成");
    } else if (f.status === "cancelled") {
      b.el.classList.add("cancelled");
      meta(b.el, "已停止");
    } else {
      b.el.classList.add("error");
      meta(b.el, "出错：" + (f.error && f.error.message ? f.error.message : "未知错误"));
    }
    stopWanted.delete(b.id);
    updateButtons();
  }

  const ASK_ERRORS = new Set(["empty", "too_long", "bad_conv", "bad_task_id", "rate_limited", "store_full",
                              "forbidden", "bad_task"]);
  function onFrame(f) {
    switch (f.type) {
      case "node":
        nodeOnline = !!f.online;
        showStatus();
        break;
      case "accepted": {
        const a = outbox.get(f.task);
        outbox.delete(f.task);
        const b = bubble(f.task, a && a.el);
        if (!b.done) meta(b.el, f.queue == null ? "已收到，等待助手…" : f.queue > 0 ? `排队中：第 ${f.queue} 位` : "正在生成…");
        updateButtons();
        break;
      }
      case "delta": {
        const b = tasks.get(f.task);
        if (!b || b.done || f.seq <= b.seq) break;  // already shown (a resume replays what the page may have)
        if (f.seq !== b.seq + 1) {  // a chunk is missing: ask again from what the page has
          if (ws) ws.send(JSON.stringify({type: "resume", task: f.task, seq: b.seq}));
          break;
        }
        b.seq = f.seq;
        b.text += f.text;
        if (!b.el.querySelector(".meta") || b.el.querySelector(".meta").textContent !== "正在生成…") {
          meta(b.el, "正在生成…");
        }
        schedule(b);
        break;
      }
      case "done": {
        const a = outbox.get(f.task);
        outbox.delete(f.task);
        finish(bubble(f.task, a && a.el), f);
        break;
      }
      case "error": {
        const b = f.task ? tasks.get(f.task) : null;
        if (b && !b.done && f.code === "not_found") {
          b.done = true;
          b.el.classList.add("error");
          meta(b.el, "无法继续显示：" + f.message);
          updateButtons();
        } else if (!f.task && ASK_ERRORS.has(f.code) && outbox.size) {
          // refused question: frames come in order, so it is the oldest one not acknowledged
          const [id, a] = outbox.entries().next().value;
          outbox.delete(id);
          add("bot error", "⚠ " + f.message, a.el);
          if (!$("q").value.trim()) $("q").value = a.text;  // the question comes back to the box
          updateButtons();
        } else if (f.code !== "not_running") {
          add("bot error", "⚠ " + f.message);
        }
        break;
      }
      default:
        break;
    }
  }

  function running() {
    return [...tasks.values()].filter((b) => !b.done && b.el.isConnected);
  }
  function updateButtons() {
    const on = signedIn;
    $("q").disabled = !on;
    $("q").placeholder = on ? "输入问题，按 Enter 发送" : "请先登录";
    $("send").disabled = !on;
    $("stop").disabled = !on || running().length === 0;
    $("newBtn").hidden = !on;
    $("logoutBtn").hidden = !on;
    $("retryBtn").hidden = !(on && reconnectTimer);
  }

  // ---- asking ----------------------------------------------------------------------------------
  function checkLength() {
    const text = $("q").value.trim();
    const n = codePoints(text);
    const max = opts.max_question;
    if (n > max) hint(`问题过长：${n} 字，最多 ${max} 字。请删减后再发送（内容已保留在输入框中）。`, "err");
    else if (n > max * 0.9) hint(`${n} / ${max} 字`, "");
    else hint("");
    return n <= max;
  }
  function autoGrow() {
    const q = $("q");
    q.style.height = "auto";
    q.style.height = Math.min(q.scrollHeight + 2, Math.round(window.innerHeight * 0.3)) + "px";
  }
  function submit() {
    const text = $("q").value.trim();
    if (!signedIn || !text) return;
    if (!checkLength()) { $("q").focus(); return; }
    const id = randomHex(16);
    const json = JSON.stringify({type: "ask", id, text, conv});
    if (new TextEncoder().encode(json).length > MAX_FRAME_BYTES) {
      hint("问题内容过大（含大量特殊字符），无法发送。请删减后再试（内容已保留在输入框中）。", "err");
      return;
    }
    $("q").value = "";
    hint("");
    autoGrow();
    const el = add("me", text);
    scrollDown(true);
    outbox.set(id, {json, el, text});
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(json);
    else meta(el, "未连接：连接恢复后自动发送");
    updateButtons();
  }
  function stop() {
    for (const b of running()) {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "stop", task: b.id}));
      else stopWanted.add(b.id);
      meta(b.el, "正在停止…");
    }
  }

  // ---- history ---------------------------------------------------------------------------------
  function clearLog() {
    $("log").textContent = "";
    tasks.clear();
    outbox.clear();
    stopWanted.clear();
    dirty.clear();
  }
  async function loadHistory(gen) {
    let got;
    try {
      got = await api(`/api/tasks?limit=${HISTORY}`);
    } catch (e) {
      if (gen === sessionGen) setStatus("无法读取历史记录", "err");
      return;
    }
    if (gen !== sessionGen || !got) return;
    clearLog();
    let prevConv;
    for (const t of got.tasks.slice().reverse()) {  // newest first -> oldest first
      if (prevConv !== undefined && (t.conv || "") !== prevConv) divider("—— 新对话 ——");
      prevConv = t.conv || "";
      const u = add("me", t.text);
      const b = bubble(t.task, u);
      if (t.status === "pending" || t.status === "accepted") {
        meta(b.el, "正在恢复…");  // resumed from seq 0 once the socket is open
      } else {
        finish(b, {status: t.status, text: t.answer || "", error: t.error, usage: t.usage});
      }
    }
    if (prevConv !== undefined && prevConv !== conv) divider("—— 新对话 ——");
    scrollDown(true);
  }

  // ---- sign-in ---------------------------------------------------------------------------------
  async function startSession(gen) {
    sessionStorage.removeItem(SS_LOGGED_OUT);
    sessionStorage.removeItem(SS_WECOM);
    $("signin").hidden = true;
    if (opts.dev && uid && uid.startsWith("web.")) $("user").value = uid.slice(4);
    retry = 0;
    setStatus("正在读取历史记录…", "warn");
    await loadHistory(gen);  // the composer opens after it: the history replaces the log
    if (gen !== sessionGen) return;
    signedIn = true;
    updateButtons();
    connect();
  }

  function signOut(message) {
    sessionGen++;
    connGen++;
    signedIn = false;
    token = null;
    uid = null;
    dropSocket();
    clearLog();
    updateButtons();
    showSignin(message || "");
  }

  function inWeCom() { return /wxwork/i.test(navigator.userAgent); }

  function showSignin(error) {
    const help = $("signinHelp");
    $("signinError").hidden = !error;
    $("signinError").textContent = error;
    $("wecomLink").hidden = true;
    if (opts.dev) {
      $("signin").hidden = !error;
      help.textContent = "开发模式：在上方输入用户名后点“登录”。";
      setStatus(error || "未登录：请在上方输入用户名并登录", error ? "err" : "warn");
      $("user").focus();
      return;
    }
    $("signin").hidden = false;
    const ways = [];
    if (opts.wecom) ways.push("在企业微信中打开「智控未来」应用（工作台 → 智控未来）");
    if (opts.miniapp) ways.push("在微信中打开「智控未来」小程序");
    if (!ways.length) ways.push("在企业微信中打开「智控未来」应用，或使用「智控未来」小程序");
    help.textContent = "本页面需要登录后使用，不支持匿名访问。请" + ways.join("，或") + "。";
    if (opts.wecom && inWeCom()) {
      $("wecomLink").hidden = false;
      const last = +(sessionStorage.getItem(SS_WECOM) || 0);
      if (!error && !sessionStorage.getItem(SS_LOGGED_OUT) && Date.now() - last > 30000) {
        sessionStorage.setItem(SS_WECOM, String(Date.now()));
        setStatus("正在通过企业微信登录…", "warn");
        location.assign("/auth/wecom");
        return;
      }
    }
    setStatus(error || "未登录", error ? "err" : "warn");
  }

  async function devLogin() {
    const name = $("user").value.trim();
    if (!$("user").checkValidity() || !name) {
      setStatus(name ? "用户名只能包含字母、数字、_、@、-，最多 64 个字符" : "请输入用户名", "err");
      $("user").focus();
      return;
    }
    // a new session and a new socket: the old ones are closed first
    const gen = ++sessionGen;
    connGen++;
    dropSocket();
    const old = localStorage.getItem(LS_REFRESH);
    forget();
    if (old) request("POST", "/api/logout", {refresh: old}).catch(() => {});
    signedIn = false;
    updateButtons();
    setStatus("正在登录…", "warn");
    let r;
    try {
      r = await request("POST", "/api/login", {dev_user: name});
    } catch (e) {
      if (gen === sessionGen) setStatus("无法连接服务器，请稍后重试", "err");
      return;
    }
    if (gen !== sessionGen) {  // another 登录 click came after this one: drop this session
      if (r.ok) request("POST", "/api/logout", {refresh: r.j.refresh}).catch(() => {});
      return;
    }
    if (!r.ok) { setStatus("登录失败：" + errMessage(r, "HTTP " + r.status), "err"); return; }
    keep(r.j);
    clearLog();
    startSession(gen);
  }

  async function logout() {
    const old = localStorage.getItem(LS_REFRESH);
    forget();
    sessionStorage.setItem(SS_LOGGED_OUT, "1");
    signOut("");
    if (old) request("POST", "/api/logout", {refresh: old}).catch(() => {});
  }

  async function loadOptions() {
    for (let attempt = 0; ; attempt++) {
      try {
        const r = await request("GET", "/api/login/options");
        if (r.ok || (r.status >= 400 && r.status < 500)) {
          const j = r.ok ? r.j : {};
          const max = Number.isInteger(j.max_question) && j.max_question > 0 ? j.max_question : DEFAULT_MAX_QUESTION;
          return {dev: j.dev === true, wecom: j.wecom === true, miniapp: j.miniapp === true, max_question: max};
        }
      } catch (e) { /* unreachable: retried */ }
      const delay = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt) * (0.5 + Math.random() / 2);
      setStatus(`无法连接服务器，${Math.max(1, Math.round(delay / 1000))} 秒后重试…`, "err");
      await new Promise((ok) => setTimeout(ok, delay));
    }
  }

  function takeFragment() {  // #signin=wecom (the end of the WeCom sign-in) and #login_error=…: read once, removed
    const params = new URLSearchParams(location.hash.slice(1));
    const out = {signin: params.get("signin"), error: params.get("login_error")};
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    return out;
  }

  // The WeCom sign-in left the new session's refresh token in an HttpOnly cookie that only this call sends (no
  // token in any URL; another site can neither plant that cookie nor have it sent, so nobody can slip the page
  // their own session). The answer is the usual token pair; the cookie's copy is spent.
  async function wecomSession() {
    const r = await request("POST", "/auth/wecom/session", {});
    if (r.ok && r.j && r.j.token) { keep(r.j); return ""; }
    if (r.status >= 500) throw new Error("session " + r.status);
    return errMessage(r, "企业微信登录已失效，请从企业微信工作台重新打开「智控未来」");
  }

  async function boot() {
    localStorage.removeItem("claw_token");  // the former 7-day token, no longer accepted
    const frag = takeFragment();
    opts = await loadOptions();
    $("devbar").hidden = !opts.dev;
    let error = "";
    if (frag.error !== null) {
      const code = frag.error.slice(0, 64);
      error = LOGIN_ERRORS[code] || `登录失败（${code.replace(/[^\w-]/g, "") || "未知原因"}），请重试。`;
    }
    if (frag.signin === "wecom") {
      try {
        error = await wecomSession();
        if (!error) { startSession(++sessionGen); return; }
      } catch (e) {
        error = "无法连接服务器，请稍后从企业微信重新打开「智控未来」";
      }
    }
    if (localStorage.getItem(LS_REFRESH)) {
      setStatus("正在登录…", "warn");
      const gen = ++sessionGen;
      let ok = false;
      try {
        ok = await renew();
      } catch (e) {
        // the edge cannot renew now (unreachable, 5xx): keep the refresh token and try again
        setStatus("无法连接服务器，请稍后刷新页面重试", "err");
        setTimeout(boot, 5000);
        return;
      }
      if (gen !== sessionGen) return;
      if (ok) { startSession(gen); return; }
      if (!error) error = "登录已过期，请重新登录";
    }
    showSignin(error);
  }

  // ---- wiring ----------------------------------------------------------------------------------
  $("form").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("q").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {  // not while an IME composes
      e.preventDefault();
      submit();
    }
  });
  $("q").addEventListener("input", () => { checkLength(); autoGrow(); });
  $("stop").addEventListener("click", stop);
  $("devbar").addEventListener("submit", (e) => { e.preventDefault(); devLogin(); });
  $("logoutBtn").addEventListener("click", logout);
  $("retryBtn").addEventListener("click", connectNow);
  $("newBtn").addEventListener("click", () => {
    conv = newConv();
    for (const [id, b] of tasks) if (b.done) tasks.delete(id);
    $("log").textContent = "";
    hint("");
    updateButtons();
    $("q").focus();
  });
  window.addEventListener("online", connectNow);
  window.addEventListener("hashchange", () => {  // a sign-in handed over while the page is open: start again
    if (/(^|[#&])(refresh|login_error)=/.test(location.hash)) location.reload();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) connectNow(); });
  boot();
})();
