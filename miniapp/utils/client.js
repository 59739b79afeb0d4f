// Ties the session (api.js), the socket (socket.js) and the conversation (chat.js) together for the pages, and
// throttles rendering: every change marks the bubbles dirty and schedules one setData for all of them, at most
// `renderMs` apart (250 ms: 4 updates a second however fast the deltas come); the end of an answer is shown at
// once. Pages subscribe with `subscribe(fn)`; fn gets setData-ready objects.

'use strict';

const { Api } = require('./api');
const { SocketClient } = require('./socket');
const { Chat, DEFAULT_MAX_QUESTION } = require('./chat');
const { createThrottle } = require('./throttle');

const CONV_KEY = 'claw_conv';

const STATE_TEXT = {
  idle: '未连接',
  connecting: '正在连接…',
  open: '已连接',
  waiting: '连接已断开，正在重连…',
  failed: '连接失败，请稍后重试',
};

function createClient(opts) {
  const o = opts || {};
  const wx = o.wx;
  const timers = { setTimeout: o.setTimeout, clearTimeout: o.clearTimeout, now: o.now };
  const api = o.api || new Api({ wx, baseUrl: o.baseUrl, devUser: o.devUser, now: o.now });
  const listeners = new Set();
  let conn = { state: 'idle', text: STATE_TEXT.idle, error: '' };
  let signedOut = false; // after 退出登录: no reconnect on onShow until the user asks or signs in

  let savedConv = '';
  try { savedConv = wx.getStorageSync(CONV_KEY) || ''; } catch (e) { savedConv = ''; }
  const chat = o.chat || new Chat({
    maxQuestion: DEFAULT_MAX_QUESTION,
    newId: o.newId,
    conv: savedConv || null,
    onConv: (conv) => {
      try {
        if (conv) wx.setStorageSync(CONV_KEY, conv);
        else wx.removeStorageSync(CONV_KEY);
      } catch (e) { /* the conversation id lasts this run */ }
    },
  });

  const emit = (update) => {
    listeners.forEach((fn) => fn(update));
  };

  const render = createThrottle(() => {
    const update = chat.takeUpdates();
    update.node = chat.nodeOnline;
    update.conn = conn;
    if (chat.notice) {
      update.notice = chat.notice;
      chat.notice = null;
    }
    emit(update);
  }, { interval: o.renderMs === undefined ? 250 : o.renderMs, ...timers });

  const send = (frame) => {
    if (socket.send(frame)) chat.onSent(frame);
  };

  const socket = o.socket || new SocketClient({
    wx,
    api,
    random: o.random,
    ...timers,
    onOpen: () => {
      chat.setConnected(true);
      chat.resumeFrames().forEach(send);
      render.schedule();
    },
    onFrame: (frame) => {
      chat.onFrame(frame).forEach(send);
      render.schedule();
      if (frame.type === 'done' || frame.type === 'error') render.flush();
    },
    onState: (state, info) => {
      if (state !== 'open') chat.setConnected(false);
      const err = info && info.error && info.error.message ? info.error.message : '';
      conn = { state, text: STATE_TEXT[state] || state, error: err || (state === 'failed' ? STATE_TEXT.failed : '') };
      render.schedule();
    },
  });

  return {
    api,
    chat,
    socket,
    render,

    // Sign in if needed, learn the edge's question limit, connect.
    async start() {
      signedOut = false;
      socket.start();
      try {
        const options = await api.loginOptions();
        if (options && Number(options.max_question) > 0) chat.maxQuestion = Number(options.max_question);
      } catch (e) {
        chat.maxQuestion = chat.maxQuestion || DEFAULT_MAX_QUESTION; // an older edge: its documented limit
      }
    },

    // Ask: {ok, error?}. A refused question changes nothing (the page keeps the typed text).
    ask(text) {
      const r = chat.ask(text);
      if (!r.ok) return r;
      send(r.frame);
      signedOut = false;
      if (socket.state === 'idle' || socket.state === 'failed') socket.start();
      render.schedule();
      return r;
    },

    stop(key) {
      const frame = chat.stop(key);
      if (frame) send(frame);
      render.flush() || render.schedule();
    },

    retry(key) {
      const frame = chat.retry(key);
      if (frame) send(frame);
      signedOut = false;
      if (socket.state === 'failed' || socket.state === 'idle') socket.start();
      render.schedule();
    },

    newConversation() {
      chat.newConversation();
      render.schedule();
    },

    // App.onShow: reconnect if the socket died in the background, else resume on the open one.
    foreground() {
      if (signedOut) return;
      if (socket.foreground()) {
        chat.resumeFrames().forEach(send);
        render.schedule();
      }
    },

    async logout() {
      signedOut = true;
      socket.stop();
      chat.newConversation();
      await api.logout();
      render.schedule();
    },

    // fn(update) with setData-ready fields; called at once with the whole state. Returns an unsubscribe.
    subscribe(fn) {
      listeners.add(fn);
      chat._reset = true; // the new page gets every bubble
      const update = chat.takeUpdates();
      update.node = chat.nodeOnline;
      update.conn = conn;
      fn(update);
      return () => listeners.delete(fn);
    },

    get conn() {
      return conn;
    },
  };
}

module.exports = { createClient, STATE_TEXT, CONV_KEY };
