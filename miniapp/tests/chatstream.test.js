// The chat page while a 100 KB answer streams (miniprogram-simulate on a fake wx): each setData carries the new
// part of the answer (new or changed blocks by path), not the whole text and all its nodes; the blocks shown
// join to exactly the nodes of the whole text; `done` with the same text sends no blocks again.
const { connected, until, page } = require('./pagekit');
const { toNodes } = require('../utils/markdown');
const { joinBlocks } = require('../utils/stream');

function longList(size) {
  let s = '';
  for (let k = 1; s.length < size; k++) s += `- 第 ${k} 条：这一条说明系统在高负载下如何保持稳定，包括限流与重试。\n`;
  return s;
}

test('chat page: a 100 KB answer streams with small setData payloads and renders whole', async () => {
  const { clock, fwx, client } = await connected();
  const comp = page('chat');
  const sizes = [];
  const setData = comp.instance.setData.bind(comp.instance);
  comp.instance.setData = (u) => {
    sizes.push({ keys: Object.keys(u), bytes: Buffer.byteLength(JSON.stringify(u)) });
    return setData(u);
  };
  comp.instance.onLoad();
  comp.instance.onInput({ detail: { value: '列出要点' } });
  comp.instance.onSend();
  const ask = fwx.sockets[0].frames('ask')[0];
  const text = longList(100000);
  const step = 400;
  sizes.length = 0;
  let seq = 0;
  for (let i = 0; i < text.length; i += step) {
    fwx.sockets[0].frame({ type: 'delta', task: ask.id, seq: ++seq, text: text.slice(i, i + step) });
    clock.advance(10);
  }
  const streaming = sizes.slice();
  const max = Math.max(...streaming.map((s) => s.bytes));
  const whole = Buffer.byteLength(JSON.stringify(toNodes(text)));
  // eslint-disable-next-line no-console
  console.log(`chat page, 100 KB list: ${streaming.length} setData calls, at most ${max} B each `
    + `(the whole answer's nodes: ${whole} B)`);
  expect(streaming.length).toBeGreaterThan(100);
  expect(max).toBeLessThan(8000); // 400 characters of list items and the paths, not 100 KB
  expect(streaming.every((s) => !s.keys.includes('messages[1].text'))).toBe(true);

  const msg = () => comp.instance.data.messages[1];
  const r = client.chat._renders.get(msg().key);
  expect(joinBlocks(msg().blocks, r.update(text).cont)).toEqual(toNodes(text));
  await until(() => comp.dom.querySelectorAll('.message--md-block').length === msg().blocks.length);
  expect(comp.dom.querySelectorAll('.message--md-block').length).toBe(msg().blocks.length);

  // done with the same text: the text once (for 复制), no blocks again
  sizes.length = 0;
  fwx.sockets[0].frame({ type: 'done', task: ask.id, seq, status: 'ok', text });
  clock.advance(10);
  const doneKeys = [].concat(...sizes.map((s) => s.keys));
  expect(doneKeys).toEqual(expect.arrayContaining(['messages[1].state', 'messages[1].text']));
  expect(doneKeys.filter((k) => k.includes('blocks'))).toEqual([]);
  expect(msg()).toMatchObject({ state: 'done', text });
  await until(() => comp.dom.querySelector('.message--ai-label'));
  expect(comp.dom.querySelector('.message--copy').textContent).toBe('复制');
});

test('chat page: done with a different text renders it once, whole', async () => {
  const { clock, fwx, client } = await connected();
  const comp = page('chat');
  comp.instance.onLoad();
  comp.instance.onInput({ detail: { value: '问' } });
  comp.instance.onSend();
  const ask = fwx.sockets[0].frames('ask')[0];
  fwx.sockets[0].frame({ type: 'delta', task: ask.id, seq: 1, text: '# 草稿\n\n第一段\n\n第二段\n\n- a\n- b\n' });
  clock.advance(10);
  expect(comp.instance.data.messages[1].blocks.length).toBeGreaterThan(1);
  const final = '# 终稿\n\n只有一段';
  fwx.sockets[0].frame({ type: 'done', task: ask.id, seq: 1, status: 'ok', text: final });
  clock.advance(10);
  const m = comp.instance.data.messages[1];
  const r = client.chat._renders.get(m.key);
  expect(joinBlocks(m.blocks, r.update(final).cont)).toEqual(toNodes(final));
  await until(() => comp.dom.querySelectorAll('.message--md-block').length === m.blocks.length);
  expect(comp.dom.querySelectorAll('.message--md-block').length).toBe(m.blocks.length);
});
