// The detail page rendered by miniprogram-simulate (its own file: the message component it uses can be loaded
// only once per file, and the chat page's tests load it too).
const { app, until, page } = require('./pagekit');

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
