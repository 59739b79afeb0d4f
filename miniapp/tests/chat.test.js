// utils/chat.js (the conversation model) and utils/throttle.js: deltas in order, duplicates and old seqs
// dropped, stop, retry, resume after a reconnect without lost or repeated text, and few setData calls.
const { Chat } = require('../utils/chat');
const { createThrottle } = require('../utils/throttle');
const { Clock, applyUpdate } = require('./helpers');
const { plainText } = require('../utils/markdown');
const { joinBlocks } = require('../utils/stream');

function ids() {
  let n = 0;
  return () => (++n).toString(16).padStart(32, '0');
}

function newChat(opts) {
  return new Chat(Object.assign({ newId: ids() }, opts));
}

function asked(chat, text) {
  const r = chat.ask(text || '你好');
  expect(r.ok).toBe(true);
  chat.onSent(r.frame);
  const msg = chat.messages.find((m) => m.key === r.key);
  return { r, msg, task: r.frame.id };
}

test('ask makes a user bubble, an assistant bubble and an ask frame with id and conv', () => {
  const convs = [];
  const chat = newChat({ onConv: (c) => convs.push(c) });
  const { r, task } = asked(chat, '问题');
  expect(r.frame).toEqual({ type: 'ask', text: '问题', id: task, conv: expect.stringMatching(/^[0-9a-f]{32}$/) });
  expect(convs).toEqual([r.frame.conv]);
  expect(chat.messages.map((m) => m.role)).toEqual(['user', 'assistant']);
  const second = chat.ask('再问').frame;
  expect(second.conv).toBe(r.frame.conv); // the same conversation
  expect(second.id).not.toBe(task);
});

test('empty and over-long questions are refused before anything is recorded', () => {
  const chat = newChat({ maxQuestion: 10 });
  expect(chat.ask('   ')).toEqual({ ok: false, error: '请输入问题' });
  const r = chat.ask('x'.repeat(11));
  expect(r.ok).toBe(false);
  expect(r.error).toContain('最多 10 字');
  expect(chat.messages).toEqual([]);
  expect(chat.ask('x'.repeat(10)).ok).toBe(true);
});

test('the default limit is the edge\'s 8000 characters', () => {
  const chat = newChat();
  expect(chat.ask('字'.repeat(8001)).ok).toBe(false);
  expect(chat.ask('字'.repeat(8000)).ok).toBe(true);
});

test('deltas append in order; duplicates and old seqs are dropped; done sets the whole text', () => {
  const chat = newChat();
  const { msg, task } = asked(chat);
  chat.onFrame({ type: 'accepted', task, queue: 0 });
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'a' });
  chat.onFrame({ type: 'delta', task, seq: 2, text: 'b' });
  chat.onFrame({ type: 'delta', task, seq: 2, text: 'b' });
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'a' });
  chat.onFrame({ type: 'delta', task, seq: 3, text: 'c' });
  expect(msg.text).toBe('abc');
  expect(chat.duplicates).toBe(2);
  expect(chat.view(msg).state).toBe('streaming');
  chat.onFrame({ type: 'done', task, seq: 3, status: 'ok', text: 'abc' });
  expect(chat.view(msg)).toMatchObject({ state: 'done', text: 'abc' });
  chat.onFrame({ type: 'delta', task, seq: 4, text: 'late' }); // nothing after done
  expect(msg.text).toBe('abc');
});

test('a gap in seq asks for a resume from the last seq seen instead of showing a hole', () => {
  const chat = newChat();
  const { msg, task } = asked(chat);
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'a' });
  expect(chat.onFrame({ type: 'delta', task, seq: 3, text: 'c' })).toEqual([{ type: 'resume', task, seq: 1 }]);
  expect(msg.text).toBe('a');
});

test('frames of unknown tasks are ignored', () => {
  const chat = newChat();
  asked(chat);
  expect(chat.onFrame({ type: 'delta', task: 'f'.repeat(32), seq: 1, text: 'x' })).toEqual([]);
  expect(chat.onFrame({ type: 'pong' })).toEqual([]);
  expect(chat.onFrame(null)).toEqual([]);
});

test('stop sends stop and the done(cancelled) ends the bubble; a never-sent ask is cancelled locally', () => {
  const chat = newChat();
  const { msg, task } = asked(chat);
  chat.onFrame({ type: 'delta', task, seq: 1, text: '一半' });
  expect(chat.stop(msg.key)).toEqual({ type: 'stop', task });
  expect(chat.view(msg)).toMatchObject({ state: 'streaming', stopping: true, note: '正在停止…' });
  chat.onFrame({ type: 'done', task, seq: 1, status: 'cancelled', text: '一半' });
  expect(chat.view(msg)).toMatchObject({ state: 'cancelled', text: '一半' });
  expect(chat.stop(msg.key)).toBeNull();

  const r = chat.ask('没发出去'); // the socket was down: never sent
  expect(chat.stop(r.key)).toBeNull();
  expect(chat.view(chat.messages.find((m) => m.key === r.key)).state).toBe('cancelled');
  expect(chat.resumeFrames()).toEqual([]);
});

test('retry after an error asks the same text again with a new id, in the same bubble', () => {
  const chat = newChat();
  const { msg, task } = asked(chat, '再试一次');
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'x' });
  chat.onFrame({ type: 'done', task, seq: 1, status: 'error', text: 'x', error: { code: 'llm_unreachable', message: '模型不可用' } });
  expect(chat.view(msg)).toMatchObject({ state: 'error', error: '模型不可用', text: 'x' });
  const f = chat.retry(msg.key);
  expect(f).toMatchObject({ type: 'ask', text: '再试一次', conv: chat.conv });
  expect(f.id).not.toBe(task);
  expect(chat.view(msg)).toMatchObject({ state: 'streaming', text: '', error: '' });
  chat.onSent(f);
  chat.onFrame({ type: 'delta', task: f.id, seq: 1, text: '好了' });
  chat.onFrame({ type: 'delta', task, seq: 2, text: 'old task' }); // the old task is forgotten
  expect(msg.text).toBe('好了');
  expect(chat.retry(msg.key)).toBeNull(); // not failed
});

test('error frames without a task fail the oldest ask waiting for its answer', () => {
  const chat = newChat();
  const a = asked(chat, 'a');
  const b = asked(chat, 'b');
  chat.onFrame({ type: 'accepted', task: a.task, queue: null });
  chat.onFrame({ type: 'error', code: 'rate_limited', message: '进行中的问题过多' });
  expect(chat.view(b.msg)).toMatchObject({ state: 'error', error: '进行中的问题过多' });
  expect(chat.view(a.msg).state).toBe('streaming');
  chat.onFrame({ type: 'error', code: 'bad_json', message: '帧不是有效的 JSON' });
  expect(chat.notice).toBe('帧不是有效的 JSON');
});

test('offline node and queue positions show in the note', () => {
  const chat = newChat();
  chat.setConnected(true);
  const { msg, task } = asked(chat);
  expect(chat.view(msg).note).toBe('思考中…');
  chat.onFrame({ type: 'accepted', task, queue: null });
  chat.onFrame({ type: 'node', online: false });
  expect(chat.view(msg).note).toBe('助手离线，问题已排队');
  chat.onFrame({ type: 'node', online: true });
  chat.onFrame({ type: 'accepted', task, queue: 2 });
  expect(chat.view(msg).note).toBe('排队中，前面还有 2 个问题');
  chat.setConnected(false);
  const other = chat.ask('断线时问');
  expect(chat.view(chat.messages.find((m) => m.key === other.key)).note).toBe('正在连接…');
});

test('resume after a reconnect: no text lost, none repeated', () => {
  const chat = newChat();
  const full = ['床前', '明月', '光，', '疑是', '地上', '霜。'];
  const a = asked(chat, 'a');
  const b = asked(chat, 'b'); // never acknowledged before the drop
  chat.onFrame({ type: 'accepted', task: a.task, queue: 0 });
  full.slice(0, 3).forEach((t, i) => chat.onFrame({ type: 'delta', task: a.task, seq: i + 1, text: t }));
  // the socket drops; a new one opens
  chat.setConnected(false);
  const frames = chat.resumeFrames();
  expect(frames).toEqual([
    { type: 'resume', task: a.task, seq: 3 },
    { type: 'ask', text: 'b', id: b.task, conv: chat.conv }, // same id: re-attaches, never asks twice
  ]);
  frames.forEach((f) => chat.onSent(f));
  // the edge replays from seq 3 on; a copy of seq 2..3 (an overlap) is dropped
  [2, 3].forEach((s) => chat.onFrame({ type: 'delta', task: a.task, seq: s, text: full[s - 1] }));
  [4, 5, 6].forEach((s) => chat.onFrame({ type: 'delta', task: a.task, seq: s, text: full[s - 1] }));
  expect(a.msg.text).toBe(full.join(''));
  chat.onFrame({ type: 'done', task: a.task, seq: 6, status: 'ok', text: full.join('') });
  expect(chat.view(a.msg)).toMatchObject({ state: 'done', text: '床前明月光，疑是地上霜。' });
  expect(chat.resumeFrames()).toEqual([{ type: 'ask', text: 'b', id: b.task, conv: chat.conv }]);
});

test('a stop lost with the socket is sent again after the reconnect', () => {
  const chat = newChat();
  const { msg, task } = asked(chat);
  chat.onFrame({ type: 'accepted', task, queue: 0 });
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'a' });
  chat.stop(msg.key);
  expect(chat.resumeFrames()).toEqual([{ type: 'resume', task, seq: 1 }, { type: 'stop', task }]);
  // not_running: it ended already; the resume brings its done
  expect(chat.onFrame({ type: 'error', code: 'not_running', task, message: '该任务不在进行中' }))
    .toEqual([{ type: 'resume', task, seq: 1 }]);
});

test('newConversation clears the bubbles and the conversation id', () => {
  const convs = [];
  const chat = newChat({ onConv: (c) => convs.push(c) });
  const first = asked(chat).r.frame.conv;
  chat.newConversation();
  expect(chat.messages).toEqual([]);
  expect(chat.conv).toBeNull();
  expect(chat.takeUpdates()).toEqual({ messages: [] });
  const next = chat.ask('新的').frame.conv;
  expect(next).not.toBe(first);
  expect(convs).toEqual([first, null, next]);
});

test('takeUpdates gives only the changed bubbles by path', () => {
  const chat = newChat();
  const { task } = asked(chat);
  expect(Object.keys(chat.takeUpdates())).toEqual(['messages']);
  expect(chat.takeUpdates()).toEqual({});
  chat.onFrame({ type: 'delta', task, seq: 1, text: 'x' });
  const u = chat.takeUpdates();
  expect(Object.keys(u)).toEqual(['messages[1].note', 'messages[1].blocks[0]']);
  expect(plainText(u['messages[1].blocks[0]'])).toBe('x');
});

test('throttle: 1000 deltas over 5 s make about 4 setData calls a second', () => {
  const clock = new Clock();
  const chat = newChat();
  const { task } = asked(chat);
  const calls = [];
  const render = createThrottle(() => calls.push({ t: clock.now(), u: chat.takeUpdates() }), { interval: 250,
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout });
  let expected = '';
  for (let s = 1; s <= 1000; s++) {
    const text = `t${s} `;
    expected += text;
    chat.onFrame({ type: 'delta', task, seq: s, text });
    render.schedule();
    clock.advance(5);
  }
  clock.advance(1000);
  expect(calls.length).toBeGreaterThanOrEqual(18);
  expect(calls.length).toBeLessThanOrEqual(22); // 5 s at 4 a second, not 1000
  for (let i = 1; i < calls.length; i++) expect(calls[i].t - calls[i - 1].t).toBeGreaterThanOrEqual(250);
  const data = {};
  calls.forEach((c) => applyUpdate(data, c.u));
  expect(plainText(joinBlocks(data.messages[1].blocks))).toBe(expected.trim());
});

test('throttle: flush runs a pending update now, cancel drops it, a quiet period runs on the next tick', () => {
  const clock = new Clock();
  let runs = 0;
  const t = createThrottle(() => runs++, { interval: 250, now: clock.now, setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout });
  t.schedule();
  expect(clock.pending()).toEqual([0]);
  clock.advance(0);
  expect(runs).toBe(1);
  t.schedule();
  t.schedule();
  expect(clock.pending()).toEqual([250]);
  expect(t.flush()).toBe(true);
  expect(runs).toBe(2);
  expect(t.flush()).toBe(false);
  t.schedule();
  t.cancel();
  clock.advance(1000);
  expect(runs).toBe(2);
});
