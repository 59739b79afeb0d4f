// utils/stream.js: a streaming answer rendered piecewise (finished blocks kept, only the tail parsed again) gives
// exactly the nodes of the whole text rendered at once, and each update's setData payload is the new part.
const { toNodes, MAX_NODES_JSON } = require('../utils/markdown');
const { StreamRender, joinBlocks } = require('../utils/stream');

// a small deterministic PRNG, so a failure can be replayed from its seed
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const LINES = ['', '', '', '  ', '# 标题', '## h2 **粗**', '- 项 a', '- 项 b', '  - 嵌套', '    - 更深', '* star',
  '1. 一', '2) 二', '10. 十', '```', '```js', '~~~', '````', '> 引用', '> ```', '>', '| a | b |', '|---|:-:|',
  '| 1 | 2 |', 'x | y', '---', '***', '    缩进', '\t制表', '正文 *斜* `代码` [链接](http://a.b)', '续行',
  '<script>alert(1)</script>', '- ```', '  ```', '  续', '1', '-', '- [ ] 任务', '___', 'a\\', '> - 引用项'];

function randomText(r, n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(LINES[Math.floor(r() * LINES.length)]);
  const sep = r() < 0.2 ? '\r\n' : '\n';
  return out.join(sep) + (r() < 0.5 ? sep : '');
}

const joined = (u) => joinBlocks(u.blocks, u.cont);

// stream `text` in random pieces; after each piece the blocks joined must equal the whole text rendered
function streamAndCheck(text, r) {
  const sr = new StreamRender();
  let i = 0;
  while (i < text.length) {
    i = Math.min(text.length, i + 1 + Math.floor(r() * 12));
    const part = text.slice(0, i);
    const { blocks, cont } = sr.update(part);
    expect(joinBlocks(blocks, cont)).toEqual(toNodes(part));
  }
  return sr;
}

test('piecewise equals whole: random markdown streamed in random pieces (property, 200 seeds)', () => {
  for (let seed = 1; seed <= 200; seed++) {
    const r = rng(seed);
    const text = randomText(r, 5 + Math.floor(r() * 40));
    try {
      streamAndCheck(text, r);
    } catch (e) {
      e.message = `seed ${seed}: ${JSON.stringify(text)}\n` + e.message;
      throw e;
    }
  }
});

// list-heavy: items, nesting, blank lines between items, rules that look like items, fences in items
const LIST_LINES = ['- a', '- b **粗**', '  - 嵌套', '    - 更深', '1. 一', '2. 二', '3) 三', '', '', '  续行', '续行',
  '- - -', '* * *', '---', '  ```', '```', '- ```', '> q', '# h', '* x', '+ y', '  1. n', '| a |', '|---|'];

test('piecewise equals whole: list-heavy markdown (property, 200 seeds)', () => {
  for (let seed = 1; seed <= 200; seed++) {
    const r = rng(1000 + seed);
    const out = [];
    for (let n = 5 + Math.floor(r() * 60); n > 0; n--) out.push(LIST_LINES[Math.floor(r() * LIST_LINES.length)]);
    const text = out.join('\n') + '\n';
    try {
      streamAndCheck(text, r);
    } catch (e) {
      e.message = `seed ${seed}: ${JSON.stringify(text)}\n` + e.message;
      throw e;
    }
  }
});

test.each([
  ['paragraphs', 'a\n\nb\n\nc\n'],
  ['a fence with blank lines stays open until closed', '```\nx\n\ny\n\nz\n```\n\nafter\n'],
  ['a list with a blank line between items', '- a\n\n- b\n\nend\n\n- c\n'],
  ['a lazy quote line is not a cut', '> q\nlazy\n\np\n'],
  ['an unclosed fence in a list item', '- a\n  ```\n\nx\n  ```\n\ny\n'],
  ['a table then text', '| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n\n| c |\n|---|\n| 3 |\n'],
  ['CRLF', 'a\r\n\r\nb\r\n\r\n# c\r\n'],
  ['a digit line becoming a list item', 'a\n\n1\n\n1. x\n'],
])('piecewise equals whole: %s', (_, text) => {
  for (let seed = 1; seed <= 20; seed++) streamAndCheck(text, rng(seed));
});

test('a final text that does not extend the streamed one starts again and equals the whole', () => {
  const sr = new StreamRender();
  sr.update('# a\n\nb\n\nc\n\nd');
  const { blocks, cont, changed } = sr.update('# x\n\ny');
  expect(joinBlocks(blocks, cont)).toEqual(toNodes('# x\n\ny'));
  expect(changed).toBeNull(); // fewer blocks: the whole array is sent
  expect(sr.update('').blocks).toEqual([]);
});

test('the 400 000-character fallback is the same piecewise as whole, and back', () => {
  const big = '- a\n'.repeat(30000); // short list lines: nodes many times the text
  const sr = new StreamRender();
  let i = 0;
  const r = rng(7);
  while (i < big.length) {
    i = Math.min(big.length, i + 1 + Math.floor(r() * 20000));
    expect(joined(sr.update(big.slice(0, i)))).toEqual(toNodes(big.slice(0, i)));
  }
  expect(JSON.stringify(sr.update(big).blocks).length).toBeLessThan(MAX_NODES_JSON);
  expect(joined(sr.update('short'))).toEqual(toNodes('short'));
});

// 100 KB answers as a model writes them: one long list (stays rich text), and sections of a heading, a list
// with inline marks and a paragraph (its nodes pass 400 000 characters of JSON near 48 KB: plain text from there)
function longList(size) {
  let s = '';
  for (let k = 1; s.length < size; k++) s += `- 第 ${k} 条：这一条说明系统在高负载下如何保持稳定，包括限流与重试。\n`;
  return s;
}

function sections(size) {
  let s = '';
  for (let n = 1; s.length < size; n++) {
    s += `## 第 ${n} 部分\n\n`;
    for (let k = 1; k <= 6; k++) s += `${k}. **要点 ${k}**：说明 \`code_${k}\` 与 *强调*，参见 [文档](https://example.com/${n}/${k})\n`;
    s += `\n小结：第 ${n} 部分的内容到此结束。\n\n`;
  }
  return s;
}

test.each([['one long list', longList(100000), false], ['sections', sections(100000), true]])(
  'a 100 KB answer (%s): per-update payload bounded, faster than a whole re-render', (name, text, plain) => {
    const step = 400; // about what arrives in 250 ms
    const sr = new StreamRender();
    const payloads = [];
    let pieceMs = 0;
    let wholeMs = 0;
    let wholeJson = 0;
    for (let i = step; i < text.length + step; i += step) {
      const part = text.slice(0, i);
      let t = process.hrtime.bigint();
      const { blocks, changed } = sr.update(part);
      // what the page sends: only the changed blocks (all of them when the array got shorter)
      const sent = changed === null ? blocks : changed.map((k) => blocks[k]);
      payloads.push(JSON.stringify(sent).length);
      pieceMs += Number(process.hrtime.bigint() - t) / 1e6;
      // what the page did before: the whole text parsed and all its nodes sent
      t = process.hrtime.bigint();
      wholeJson = Math.max(wholeJson, JSON.stringify(toNodes(part)).length);
      wholeMs += Number(process.hrtime.bigint() - t) / 1e6;
    }
    const n = payloads.length;
    const sorted = payloads.slice().sort((a, b) => b - a);
    // eslint-disable-next-line no-console
    console.log(`100 KB answer (${name}): ${n} updates of ${step} characters; piecewise ${(pieceMs / n).toFixed(2)} ms `
      + `and ${Math.round(payloads.reduce((a, b) => a + b, 0) / n)} B a update on average, at most ${sorted[0]} B `
      + `(then ${sorted[1]} B); whole re-render ${(wholeMs / n).toFixed(2)} ms and up to ${wholeJson} B`);
    expect(joined(sr.update(text))).toEqual(toNodes(text));
    expect(toNodes(text)[0].children[0].name === 'pre').toBe(plain);
    // the new part, not the whole answer's nodes; once, the switch to plain text sends the text so far
    expect(sorted[plain ? 1 : 0]).toBeLessThan(20000);
    expect(sorted[0]).toBeLessThan(wholeJson);
    expect(pieceMs * 3).toBeLessThan(wholeMs); // generous: measured in the same run
  });

test('a long list is cut between items; shown, an ordered one numbers on', () => {
  let text = '';
  for (let k = 1; k <= 50; k++) text += `${k}. 第 ${k} 项\n`;
  const sr = new StreamRender();
  let u;
  for (let i = 1; i <= text.length; i += 7) u = sr.update(text.slice(0, i));
  u = sr.update(text);
  expect(u.blocks.length).toBeGreaterThan(3);
  expect(joined(u)).toEqual(toNodes(text));
  const lists = u.blocks.map((b) => b[0].children[0]);
  let next = 1;
  for (const l of lists) {
    expect(l.name).toBe('ol');
    expect(parseInt(l.attrs.start || '1', 10)).toBe(next);
    next += l.children.length;
  }
  expect(next).toBe(51);
});
