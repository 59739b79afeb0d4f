// The detail page rendered by miniprogram-simulate (its own file: the message component it uses can be loaded
// only once per file, and the chat page's tests load it too).
const path = require('path');
const simulate = require('miniprogram-simulate');
const { createClient } = require('../utils/client');
const { Clock, fakeWx, settle, edgeRoutes } = require('./helpers');

const ROOT = path.resolve(__dirname, '..');

function app() {
  const clock = new Clock();
  const nowS = () => Math.floor(clock.now() / 1000) + 1700000000;
  const fwx = fakeWx(edgeRoutes(nowS));
  let n = 0;
  const client = createClient({ wx: fwx, baseUrl: 'https://edge.example.com', random: () => 1, now: clock.now,
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, renderMs: 0,
    newId: () => (++n).toString(16).padStart(32, '0') });
  global.getApp = () => ({ globalData: { client } });
  return { clock, fwx, client };
}

// the simulated view updates on a timer: wait for the condition, bounded
async function until(cond) {
  for (let i = 0; i < 200 && !cond(); i++) await simulate.sleep(5);
  return cond();
}

const loaded = new Map(); // a path loaded twice renders nothing: load once per test file
function page(name) {
  if (!loaded.has(name)) loaded.set(name, simulate.load(path.join(ROOT, 'pages', name, 'index'), { rootPath: ROOT }));
  const comp = simulate.render(loaded.get(name));
  comp.attach(document.createElement('parent-wrapper'));
  return comp;
}


test('detail page: the whole answer of one task, markdown; a failed one offers retry', async () => {
  const { fwx } = app();
  const id = 'ab'.repeat(16);
  fwx.routes[`GET /api/tasks/${id}`] = () => [200, { task: id, text: '问题', ts: 1700000000000, status: 'error',
    answer: '## 一半\n\n- a', error: { code: 'llm_unreachable', message: '模型不可用' } }];
  const comp = page('detail');
  await comp.instance.onLoad({ id });
  expect(comp.instance.data).toMatchObject({ state: 'error', status: '出错', answerError: '模型不可用', loading: false });
  expect(comp.dom.querySelectorAll('message').length).toBe(2);
  await until(() => comp.dom.textContent.includes('重试'));
  expect(comp.dom.textContent).toContain('模型不可用');
  expect(comp.dom.textContent).toContain('重试');
  const bad = page('detail');
  await bad.instance.onLoad({ id: '../../etc' });
  expect(bad.instance.data.error).toBe('没有找到该内容');
});
