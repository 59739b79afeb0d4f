// The chat, history and me pages rendered by miniprogram-simulate against a client on a fake wx.
const { app, connected, until, page } = require('./pagekit');

test('chat page: an over-long question is refused and the text stays; a short one becomes bubbles', async () => {
  const { clock, fwx } = await connected();
  const comp = page('chat');
  comp.instance.onLoad();
  const long = '长'.repeat(8001);
  comp.instance.onInput({ detail: { value: long } });
  expect(comp.instance.data.inputError).toContain('超过上限 8000 字');
  comp.instance.onSend();
  expect(comp.instance.data.input).toBe(long);
  expect(comp.instance.data.inputError).toContain('最多 8000 字');
  expect(fwx.sockets[0].frames('ask')).toEqual([]);

  comp.instance.onInput({ detail: { value: '你好' } });
  comp.instance.onSend();
  expect(comp.instance.data.input).toBe('');
  const ask = fwx.sockets[0].frames('ask')[0];
  fwx.sockets[0].frame({ type: 'delta', task: ask.id, seq: 1, text: '**你好**' });
  clock.advance(10);
  expect(comp.instance.data.messages.map((m) => m.state)).toEqual(['user', 'streaming']);
  expect(comp.dom.querySelectorAll('message').length).toBe(2);
  expect(comp.dom.querySelector('.message--user-text').textContent).toBe('你好');
  expect(comp.dom.querySelector('.message--stop').textContent).toBe('停止');
  comp.instance.onStop({ detail: { key: comp.instance.data.messages[1].key } });
  expect(fwx.sockets[0].frames('stop')).toEqual([{ type: 'stop', task: ask.id }]);
});

test('history page: pages with before = the oldest ts shown', async () => {
  const { fwx } = app();
  const task = (i) => ({ task: i.toString(16).padStart(32, '0'), text: `问题 ${i}`, ts: 1700000000000 - i * 1000,
    status: i % 2 ? 'ok' : 'error', ch: 'mp', answer: '' });
  const seen = [];
  fwx.routes['GET /api/tasks'] = (o) => {
    seen.push(o.url.split('?')[1]);
    const before = /before=(\d+)/.exec(o.url);
    const start = before ? (1700000000000 - Number(before[1])) / 1000 + 1 : 1;
    const count = start > 20 ? 5 : 20;
    return [200, { tasks: Array.from({ length: count }, (_, k) => task(start + k)) }];
  };
  const comp = page('history');
  await comp.instance.onLoad();
  expect(comp.instance.data.items.length).toBe(20);
  expect(comp.instance.data.items[0]).toMatchObject({ title: '问题 1', statusText: '已完成' });
  expect(comp.instance.data.items[1].statusText).toBe('出错');
  await comp.instance.onReachBottom();
  expect(comp.instance.data.items.length).toBe(25);
  expect(comp.instance.data.done).toBe(true);
  expect(seen).toEqual(['limit=20', `limit=20&before=${1700000000000 - 20000}`]);
  await comp.instance.onReachBottom(); // the end: no more requests
  expect(seen.length).toBe(2);
});

test('me page: the uid shortened, node state, 退出登录 signs out', async () => {
  const { fwx, client } = await connected();
  fwx.sockets[0].frame({ type: 'node', online: false });
  client.render.flush();
  const comp = page('me');
  comp.instance.onLoad();
  expect(comp.instance.data).toMatchObject({ uid: 'mp.oUser…cdef', signedIn: true, node: false });
  expect(comp.dom.textContent).toContain('离线（问题会排队）');
  await comp.instance.onLogout();
  expect(comp.instance.data.signedIn).toBe(false);
  expect(fwx.keys('POST /api/logout').length).toBe(1);
});
