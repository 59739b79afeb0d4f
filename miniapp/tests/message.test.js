// The message component (components/message) rendered by miniprogram-simulate: every state, markdown.
const path = require('path');
const simulate = require('miniprogram-simulate');
const { plainText } = require('../utils/markdown');

const COMP = path.resolve(__dirname, '../components/message/index');

function render(props) {
  const id = simulate.load(COMP);
  const comp = simulate.render(id, props);
  comp.attach(document.createElement('parent-wrapper'));
  return comp;
}

function names(nodes, out = []) {
  for (const n of nodes) {
    if (n.name) out.push(n.name);
    if (n.children) names(n.children, out);
  }
  return out;
}

// miniprogram-simulate delivers tap events on a timer: wait for the condition, bounded, not for a fixed time
async function until(cond) {
  for (let i = 0; i < 200 && !cond(); i++) await simulate.sleep(5);
  return cond();
}

beforeEach(() => jest.resetModules());

test('user: plain text on the right, no markdown', () => {
  const comp = render({ role: 'user', state: 'user', text: '**不是** markdown <b>' });
  expect(comp.querySelector('.row-user')).toBeTruthy();
  expect(comp.querySelector('.user-text').dom.textContent).toBe('**不是** markdown <b>');
  expect(comp.querySelector('.md')).toBeFalsy();
  expect(comp.instance.data.nodes).toEqual([]);
});

test('streaming without text: dots, the note and a stop button that fires stop', async () => {
  const comp = render({ msgKey: 'm2', role: 'assistant', state: 'streaming', text: '', note: '助手离线，问题已排队' });
  expect(comp.querySelector('.dots')).toBeTruthy();
  expect(comp.querySelector('.note').dom.textContent).toBe('助手离线，问题已排队');
  const seen = [];
  comp.addEventListener('stop', (e) => seen.push(e.detail));
  comp.querySelector('.stop').dispatchEvent('tap');
  await until(() => seen.length > 0);
  expect(seen).toEqual([{ key: 'm2' }]);
  expect(comp.querySelector('.retry')).toBeFalsy();
});

test('streaming with text renders markdown; while stopping the button does nothing', async () => {
  const comp = render({ msgKey: 'm2', state: 'streaming', text: '# 标题\n\n正文', stopping: true });
  expect(comp.querySelector('.md')).toBeTruthy();
  expect(comp.querySelector('.dots')).toBeFalsy();
  expect(names(comp.instance.data.nodes)).toEqual(expect.arrayContaining(['h1', 'p']));
  const seen = [];
  comp.addEventListener('stop', (e) => seen.push(e.detail));
  comp.querySelector('.stop').dispatchEvent('tap');
  const tapped = [];
  comp.querySelector('.stop').addEventListener('tap', () => tapped.push(1));
  comp.querySelector('.stop').dispatchEvent('tap');
  await until(() => tapped.length > 0); // the second tap was delivered, so the first one was too
  expect(seen).toEqual([]);
  expect(comp.querySelector('.stop').dom.textContent).toBe('停止中');
});

test('done: the AI label, no stop or retry', () => {
  const comp = render({ state: 'done', text: '答案' });
  expect(comp.querySelector('.ai-label').dom.textContent).toBe('AI 生成');
  expect(comp.querySelector('.stop')).toBeFalsy();
  expect(comp.querySelector('.retry')).toBeFalsy();
  expect(plainText(comp.instance.data.nodes)).toBe('答案');
});

test('error: the message and a retry button that fires retry', async () => {
  const comp = render({ msgKey: 'm4', state: 'error', text: '一半', error: '模型服务不可用' });
  expect(comp.querySelector('.err').dom.textContent).toBe('模型服务不可用');
  const seen = [];
  comp.addEventListener('retry', (e) => seen.push(e.detail));
  comp.querySelector('.retry').dispatchEvent('tap');
  await until(() => seen.length > 0);
  expect(seen).toEqual([{ key: 'm4' }]);
  expect(plainText(comp.instance.data.nodes)).toBe('一半');
});

test('cancelled: the text so far and [已停止]', () => {
  const comp = render({ state: 'cancelled', text: '写到一半' });
  expect(comp.querySelector('.note').dom.textContent).toBe('[已停止]');
  expect(comp.querySelector('.stop')).toBeFalsy();
  expect(plainText(comp.instance.data.nodes)).toBe('写到一半');
});

test('markdown table and code block become table and pre nodes, escaped', () => {
  const comp = render({ state: 'done', text: '| a | b |\n|---|---|\n| <i>1</i> | 2 |\n\n```\n<script>x</script>\n```' });
  const n = names(comp.instance.data.nodes);
  expect(n).toEqual(expect.arrayContaining(['table', 'thead', 'tbody', 'tr', 'th', 'td', 'pre', 'code']));
  expect(n).not.toContain('script');
  expect(n).not.toContain('i');
  expect(JSON.stringify(comp.instance.data.nodes)).toContain('&lt;script&gt;x&lt;/script&gt;');
});

test('the text updating re-renders the nodes (what each throttled setData does)', () => {
  const comp = render({ state: 'streaming', text: 'a' });
  comp.setData({ text: 'a **b**' });
  expect(names(comp.instance.data.nodes)).toContain('strong');
});

test('given blocks (the chat page), one rich-text per block and no own nodes', () => {
  const { toNodes } = require('../utils/markdown');
  const blocks = [toNodes('# 一'), toNodes('二')];
  const comp = render({ state: 'streaming', text: '', blocks });
  expect(comp.querySelectorAll('.md-block').length).toBe(2);
  expect(comp.querySelector('.dots')).toBeFalsy();
  expect(comp.instance.data.nodes).toEqual([]);
  comp.setData({ blocks: [] , text: '三' }); // no blocks: the bubble renders its text itself
  expect(plainText(comp.instance.data.nodes)).toBe('三');
});
