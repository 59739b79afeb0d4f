// The conversation model of the chat page, pure (no wx, no timers): questions and answers, the WebSocket
// frames they make and the frames from the edge that change them. The page (through utils/client.js) sends what
// the methods return and renders `takeUpdates()` with setData.
//
// Answers stream as `delta` frames with seq 1, 2, ...: a delta whose seq is not the next one is dropped (a
// duplicate from a replay) or, past a gap, answered with a `resume` from the last seq seen, so the text is never
// repeated nor missing. `done` carries the whole answer and replaces the text. Every ask carries its own task
// id (32 hex), so resending it after a reconnect re-attaches to the same task instead of asking twice.

'use strict';

const { StreamRender } = require('./stream');

const DEFAULT_MAX_QUESTION = 8000; // the edge's limit (characters), /api/login/options `max_question`

// error frames without a task that answer an ask (the edge answers the asks of one socket in order)
const ASK_ERRORS = new Set(['empty', 'too_long', 'bad_conv', 'bad_task_id', 'rate_limited', 'store_full',
  'forbidden', 'bad_task']);

const UNFINISHED = new Set(['sending', 'queued', 'streaming', 'stopping']);

function randomHex32(random) {
  const r = random || Math.random;
  let s = '';
  for (let i = 0; i < 32; i++) s += Math.floor(r() * 16).toString(16);
  return s;
}

class Chat {
  // opts: maxQuestion, newId() -> 32 hex, conv (a saved conversation id), onConv(conv) (persist it)
  constructor(opts) {
    const o = opts || {};
    this.maxQuestion = o.maxQuestion || DEFAULT_MAX_QUESTION;
    this.newId = o.newId || (() => randomHex32());
    this.onConv = o.onConv || (() => {});
    this.conv = o.conv || null;
    this.messages = [];
    this.nodeOnline = null; // unknown until the first `node` frame
    this.connected = false;
    this.notice = null; // the latest message for the user not tied to an answer (a toast)
    this.duplicates = 0; // deltas dropped as already seen
    this._awaiting = []; // keys of asks sent on the current socket, not yet accepted nor refused
    this._dirty = new Set();
    this._reset = true;
    this._seq = 0;
    this._renders = new Map(); // key -> StreamRender of an answer
    this._shown = new Map(); // key -> the bubble as last sent
  }

  // ---- questions

  // Check a question without changing anything: null if it can be sent, else a Chinese message.
  check(text) {
    if (typeof text !== 'string' || !text.trim()) return '请输入问题';
    if (text.length > this.maxQuestion) {
      return `问题过长：${text.length} 字，最多 ${this.maxQuestion} 字，请删减后再发送`;
    }
    return null;
  }

  // Ask: {ok: true, frame, key} or {ok: false, error} (nothing recorded; the caller keeps the typed text).
  ask(text) {
    const error = this.check(text);
    if (error) return { ok: false, error };
    if (!this.conv) {
      this.conv = this.newId();
      this.onConv(this.conv);
    }
    this._push({ role: 'user', text });
    const msg = this._push({ role: 'assistant', question: text, text: '', seq: 0, state: 'sending',
      task: this.newId(), accepted: false, sent: false, queue: null, error: null });
    return { ok: true, frame: this._askFrame(msg), key: msg.key };
  }

  // Stop an unfinished answer: the frame to send (null if there is nothing to stop).
  stop(key) {
    const msg = this._get(key);
    if (!msg || !UNFINISHED.has(msg.state)) return null;
    if (!msg.sent && !msg.accepted) { // never left this phone: cancel it here
      msg.state = 'cancelled';
      this._awaiting = this._awaiting.filter((k) => k !== key);
      this._touch(msg);
      return null;
    }
    msg.state = 'stopping';
    this._touch(msg);
    return { type: 'stop', task: msg.task };
  }

  // Ask the question of a failed (or stopped) answer again, in the same bubble: the ask frame, or null.
  retry(key) {
    const msg = this._get(key);
    if (!msg || (msg.state !== 'error' && msg.state !== 'cancelled')) return null;
    Object.assign(msg, { text: '', seq: 0, state: 'sending', task: this.newId(), accepted: false, sent: false,
      queue: null, error: null });
    this._touch(msg);
    return this._askFrame(msg);
  }

  // 新对话: forget the conversation id and the bubbles (unfinished answers go on at the edge, unseen here).
  newConversation() {
    this.conv = null;
    this.onConv(null);
    this.messages = [];
    this._awaiting = [];
    this._dirty.clear();
    this._renders.clear();
    this._reset = true;
  }

  // ---- the socket

  // A frame was written to the socket.
  onSent(frame) {
    if (frame && frame.type === 'ask') {
      const msg = this._byTask(frame.id);
      if (msg) {
        msg.sent = true;
        this._awaiting.push(msg.key);
      }
    }
  }

  // The socket is open (first time, after a reconnect, or back from the background): what to send so every
  // unfinished answer continues where this phone left it — `resume` from the last seq seen, the ask again
  // (same id) if the edge never acknowledged it, and the stop again for an answer being stopped.
  resumeFrames() {
    this._awaiting = [];
    const out = [];
    for (const msg of this.messages) {
      if (msg.role !== 'assistant' || !UNFINISHED.has(msg.state)) continue;
      if (!msg.accepted) out.push(this._askFrame(msg));
      else out.push({ type: 'resume', task: msg.task, seq: msg.seq });
      if (msg.state === 'stopping') out.push({ type: 'stop', task: msg.task });
    }
    return out;
  }

  setConnected(connected) {
    if (this.connected === connected) return;
    this.connected = connected;
    this._touchPending();
  }

  // A frame from the edge: returns the frames to send in answer (a `resume` after a gap).
  onFrame(f) {
    if (!f || typeof f !== 'object') return [];
    switch (f.type) {
      case 'node':
        this.nodeOnline = !!f.online;
        this._touchPending();
        return [];
      case 'accepted': {
        const msg = this._byTask(f.task);
        if (!msg) return [];
        this._awaiting = this._awaiting.filter((k) => k !== msg.key);
        msg.accepted = true;
        msg.queue = typeof f.queue === 'number' ? f.queue : null;
        if (msg.state === 'sending') msg.state = 'queued';
        this._touch(msg);
        return [];
      }
      case 'delta': {
        const msg = this._byTask(f.task);
        if (!msg || !UNFINISHED.has(msg.state) || typeof f.seq !== 'number' || typeof f.text !== 'string') return [];
        if (f.seq <= msg.seq) {
          this.duplicates++;
          return [];
        }
        if (f.seq !== msg.seq + 1) return [{ type: 'resume', task: msg.task, seq: msg.seq }]; // a gap
        msg.seq = f.seq;
        msg.text += f.text;
        msg.accepted = true;
        if (msg.state !== 'stopping') msg.state = 'streaming';
        this._touch(msg);
        return [];
      }
      case 'done': {
        const msg = this._byTask(f.task);
        if (!msg || !UNFINISHED.has(msg.state)) return [];
        if (typeof f.text === 'string') msg.text = f.text; // the whole answer
        if (typeof f.seq === 'number') msg.seq = Math.max(msg.seq, f.seq);
        msg.accepted = true;
        if (f.status === 'ok') msg.state = 'done';
        else if (f.status === 'cancelled') msg.state = 'cancelled';
        else {
          msg.state = 'error';
          msg.error = (f.error && f.error.message) || '回答出错了';
        }
        this._touch(msg);
        return [];
      }
      case 'error':
        return this._onError(f);
      default:
        return []; // pong and anything newer
    }
  }

  _onError(f) {
    const message = typeof f.message === 'string' && f.message ? f.message : '请求出错';
    if (f.task) {
      const msg = this._byTask(f.task);
      if (!msg || !UNFINISHED.has(msg.state)) return [];
      if (f.code === 'not_running') {
        // the task has already finished (or is not known yet): its done tells how it ended
        return msg.accepted ? [{ type: 'resume', task: msg.task, seq: msg.seq }] : [];
      }
      msg.state = 'error';
      msg.error = f.code === 'not_found' ? '找不到这个回答（可能已过期），请重试' : message;
      this._touch(msg);
      return [];
    }
    if (ASK_ERRORS.has(f.code) && this._awaiting.length) {
      const msg = this._get(this._awaiting.shift());
      if (msg && UNFINISHED.has(msg.state)) {
        msg.state = 'error';
        msg.error = message;
        this._touch(msg);
        return [];
      }
    }
    this.notice = message;
    return [];
  }

  // ---- rendering

  unfinished() {
    return this.messages.filter((m) => m.role === 'assistant' && UNFINISHED.has(m.state));
  }

  // What setData needs since the last call: the whole list after a reset; else a bubble not sent yet whole, and
  // for the others only the fields that changed, by path (`messages[i].state`, ...). An answer's text is shown
  // as `blocks` (utils/stream.js: one rich-text node array each, finished blocks kept while it streams): only the
  // new or changed blocks are sent (`messages[i].blocks[k]`), and the text itself (for 复制) only once the answer
  // has ended, so an update carries the new part of an answer, not all of it.
  takeUpdates() {
    const out = {};
    if (this._reset) {
      this._shown = new Map();
      out.messages = this.messages.map((m) => this._ship(m).view);
      this._reset = false;
    } else {
      for (const key of this._dirty) {
        const i = this.messages.findIndex((m) => m.key === key);
        if (i < 0) continue;
        const before = this._shown.get(key);
        const { view, changed } = this._ship(this.messages[i]);
        if (!before) {
          out[`messages[${i}]`] = view;
          continue;
        }
        for (const f of Object.keys(view)) {
          if (f !== 'blocks' && view[f] !== before[f]) out[`messages[${i}].${f}`] = view[f];
        }
        if (changed === null) out[`messages[${i}].blocks`] = view.blocks;
        else changed.forEach((k) => { out[`messages[${i}].blocks[${k}]`] = view.blocks[k]; });
      }
    }
    this._dirty.clear();
    return out;
  }

  // The bubble as sent to the page: view() with the blocks, the text only once the answer has ended.
  _ship(m) {
    const view = this.view(m);
    let changed = null;
    if (m.role === 'assistant') {
      let r = this._renders.get(m.key);
      if (!r) {
        r = new StreamRender();
        this._renders.set(m.key, r);
      }
      const u = r.update(m.text);
      view.blocks = u.blocks;
      changed = u.changed;
      if (view.state === 'streaming') view.text = '';
    } else {
      view.blocks = [];
    }
    this._shown.set(m.key, view);
    return { view, changed };
  }

  // A bubble as the message component shows it.
  view(m) {
    if (m.role === 'user') return { key: m.key, role: 'user', state: 'user', text: m.text, note: '', error: '' };
    let state = m.state;
    if (UNFINISHED.has(state)) state = 'streaming';
    return { key: m.key, role: 'assistant', state, text: m.text, note: this._note(m), error: m.error || '',
      stopping: m.state === 'stopping' };
  }

  _note(m) {
    switch (m.state) {
      case 'stopping': return '正在停止…';
      case 'cancelled': return '已停止';
      case 'sending':
      case 'queued':
        if (this.nodeOnline === false) return '助手离线，问题已排队';
        if (m.state === 'sending' && !this.connected) return '正在连接…';
        if (m.queue > 0) return `排队中，前面还有 ${m.queue} 个问题`;
        return '思考中…';
      case 'streaming':
        return this.nodeOnline === false ? '助手离线，回答将在恢复后继续' : '';
      default:
        return '';
    }
  }

  // ---- internals

  _askFrame(msg) {
    const frame = { type: 'ask', text: msg.question, id: msg.task };
    if (this.conv) frame.conv = this.conv;
    return frame;
  }

  _push(fields) {
    const msg = Object.assign({ key: 'm' + (++this._seq) }, fields);
    this.messages.push(msg);
    this._touch(msg);
    return msg;
  }

  _get(key) {
    return this.messages.find((m) => m.key === key) || null;
  }

  _byTask(task) {
    if (typeof task !== 'string') return null;
    return this.messages.find((m) => m.role === 'assistant' && m.task === task) || null;
  }

  _touch(msg) {
    this._dirty.add(msg.key);
  }

  _touchPending() {
    for (const m of this.messages) if (m.role === 'assistant' && UNFINISHED.has(m.state)) this._touch(m);
  }
}

module.exports = { Chat, randomHex32, DEFAULT_MAX_QUESTION, ASK_ERRORS };
