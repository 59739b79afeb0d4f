// utils/markdown.js, table-driven: markdown in, the rich-text node tree (as a compact string) out.
const { toNodes, plainText, ALLOWED } = require('../utils/markdown');

// compact form: name(children) for elements, "text" for text nodes
function compact(nodes) {
  return nodes.map((n) => (n.type === 'text' ? JSON.stringify(n.text) : `${n.name}(${compact(n.children || [])})`))
    .join(' ');
}
const root = (md) => compact(toNodes(md)[0].children);

const CASES = [
  ['paragraph with a line break', 'a\nb', 'p("a" br() "b")'],
  ['two paragraphs', 'a\n\nb', 'p("a") p("b")'],
  ['headings', '# H1\n### H3 ###', 'h1("H1") h3("H3")'],
  ['bold, italic, strike, inline code', '**b** *i* _j_ ~~s~~ `c`',
    'p(strong("b") " " em("i") " " em("j") " " del("s") " " code("c"))'],
  ['bold inside italic', '*a **b** c*', 'p(em("a " strong("b") " c"))'],
  ['snake_case is not italic', 'a_b_c and x_y', 'p("a_b_c and x_y")'],
  ['backslash escapes', '\\*not\\* \\`x\\`', 'p("*not* `x`")'],
  ['script tag is text', '<script>alert(1)</script>', 'p("&lt;script&gt;alert(1)&lt;/script&gt;")'],
  ['html attributes are text', '<img src=x onerror="a()">', 'p("&lt;img src=x onerror=&quot;a()&quot;&gt;")'],
  ['entities are not decoded', '&lt;b&gt; &amp;', 'p("&amp;lt;b&amp;gt; &amp;amp;")'],
  ['markup in inline code is text', '`<b>x</b>`', 'p(code("&lt;b&gt;x&lt;/b&gt;"))'],
  ['link shown as text', '[文档](https://example.com/a)', 'p(span("文档" " (https://example.com/a)"))'],
  ['javascript link is only text', '[x](javascript:alert(1))', 'p(span("x" " (javascript:alert(1))"))'],
  ['bullet list', '- a\n- b', 'ul(li("a") li("b"))'],
  ['ordered list', '1. a\n2. b', 'ol(li("a") li("b"))'],
  ['nested lists', '- a\n  - b\n    1. c\n- d',
    'ul(li("a" ul(li("b" ol(li("c"))))) li("d"))'],
  ['list item with a continuation line', '- a\n  more\n- b', 'ul(li("a" br() "more") li("b"))'],
  ['loose list stays one list', '- a\n\n- b', 'ul(li("a") li("b"))'],
  ['list after a paragraph', 'intro\n- a', 'p("intro") ul(li("a"))'],
  ['fenced code keeps text verbatim', '```\n<b>**x**</b>\n  indented\n```',
    'pre(code("&lt;b&gt;**x**&lt;/b&gt;\\n  indented"))'],
  ['fenced code with a language', '```python\nprint(1)\n```', 'div(div("python") pre(code("print(1)")))'],
  ['unclosed fence while streaming', 'x\n```js\nlet a', 'p("x") div(div("js") pre(code("let a")))'],
  ['tilde fence', '~~~\n# not a heading\n~~~', 'pre(code("# not a heading"))'],
  ['table', '| a | b |\n|---|:-:|\n| 1 | **2** |',
    'table(thead(tr(th("a") th("b"))) tbody(tr(td("1") td(strong("2")))))'],
  ['table with a short row and an escaped pipe', '| a | b |\n|---|---|\n| x\\|y |',
    'table(thead(tr(th("a") th("b"))) tbody(tr(td("x|y") td())))'],
  ['table cell with script', '| h |\n|---|\n| <script>x</script> |',
    'table(thead(tr(th("h"))) tbody(tr(td("&lt;script&gt;x&lt;/script&gt;"))))'],
  ['block quote', '> a\n> b', 'blockquote(p("a" br() "b"))'],
  ['horizontal rule', 'a\n\n---\n\nb', 'p("a") hr() p("b")'],
  ['CRLF line ends', 'a\r\nb', 'p("a" br() "b")'],
];

test.each(CASES)('%s', (_name, md, expected) => {
  expect(root(md)).toBe(expected);
});

test('empty or non-string input gives no nodes', () => {
  expect(toNodes('')).toEqual([]);
  expect(toNodes(null)).toEqual([]);
});

test('only allowed element names and attributes, whatever the input', () => {
  const evil = '<script>x</script>\n<iframe src=//e>\n[a](" onclick="x)\n| <style> |\n|---|\n| <svg onload=1> |\n'
    + '```\n</code><script>\n```\n' + '- '.repeat(50) + 'deep\n' + '>'.repeat(40) + ' q\n' + '*'.repeat(2000);
  const walk = (ns) => ns.forEach((n) => {
    if (n.type === 'text') {
      expect(n.text).not.toMatch(/[<>"']/);
      return;
    }
    expect(ALLOWED.has(n.name)).toBe(true);
    for (const k of Object.keys(n.attrs || {})) expect(['class', 'style', 'start']).toContain(k);
    walk(n.children || []);
  });
  walk(toNodes(evil));
  expect(plainText(toNodes('<b>&amp;</b>'))).toBe('<b>&amp;</b>');
});

test('a long answer parses quickly', () => {
  const md = ('## 标题\n\n' + '- 项目 **加粗** `code`\n'.repeat(20) + '\n| a | b |\n|---|---|\n' + '| 1 | 2 |\n'.repeat(20)
    + '\n```\n' + 'x = 1\n'.repeat(50) + '```\n\n' + '段落文字'.repeat(50) + '\n\n').repeat(20);
  const t0 = Date.now();
  const nodes = toNodes(md);
  expect(nodes[0].children.length).toBeGreaterThan(80);
  expect(Date.now() - t0).toBeLessThan(1000); // generous: ~10 ms here
});

// setData takes at most 1 MB a call: a long or hostile answer must not make nodes that big (a table of 1 000 header
// columns and 1 000 rows was 54 MB from 6 KB; 50 000 short lines 4 MB), nor take long to make.
describe('bounded nodes for setData', () => {
  const LIMIT = 1024 * 1024;
  const cases = {
    'table bomb': '|a'.repeat(1000) + '|\n|' + '-|'.repeat(1000) + '\n' + '|\n'.repeat(1000),
    'wide table': '|a'.repeat(30000) + '|\n|-|\n|b|\n',
    'long table': '| a | b |\n|---|---|\n' + '| 1 | 2 |\n'.repeat(20000),
    'many lines': 'a\n'.repeat(50000),
    'many items': '- a\n'.repeat(25000),
    'many code spans': ('`a'.repeat(3300) + '\n').repeat(10),
    'many fences': '```\n'.repeat(20000),
    'quotes and controls': '\'"<>&\u0001'.repeat(40000),
  };
  test.each(Object.entries(cases))('%s', (_name, md) => {
    const t = Date.now();
    const nodes = toNodes(md);
    expect(Date.now() - t).toBeLessThan(3000); // generous: ~100 ms here
    const json = JSON.stringify(nodes).length;
    expect(json).toBeLessThan(LIMIT / 2);
    expect(plainText(nodes).length).toBeGreaterThan(Math.min(md.length, 40000) / 2); // shown, not dropped
  });

  test('a table within the limits is still a table; a too long one goes on as text', () => {
    const ok = toNodes('| a | b |\n|---|---|\n| 1 | 2 |')[0].children[0];
    expect(ok.name).toBe('table');
    const long = toNodes('| a | b |\n|---|---|\n' + '| 1 | 2 |\n'.repeat(1500))[0].children;
    expect(long[0].name).toBe('table');
    expect(long[1].name).toBe('p');
    expect(plainText(long).split('1').length - 1).toBe(1500);
  });

  test('a cut answer says so', () => {
    const nodes = toNodes('\u0001\n'.repeat(200000));
    expect(JSON.stringify(nodes).length).toBeLessThan(LIMIT / 2);
    expect(plainText(nodes)).toMatch(/回答过长/);
  });
});

// Inputs that cost quadratic time or unbounded recursion: timed generously (~50 ms here; 1.5-2 s or a crash before).
describe('bounded work on hostile lines', () => {
  const cases = {
    'a line of `- - - … x` (a list in a list …: the stack overflowed)': ('- '.repeat(4999) + 'x\n').repeat(10),
    'ten thousand `[` on a line': ('['.repeat(9999) + '\n').repeat(10),
    '`__a` repeated': ('__a'.repeat(3333) + '\n').repeat(10),
    '`_a__` repeated': ('_a__'.repeat(2499) + '\n').repeat(10),
  };
  test.each(Object.entries(cases))('%s', (_name, md) => {
    const t = Date.now();
    const nodes = toNodes(md);
    expect(Date.now() - t).toBeLessThan(800);
    expect(plainText(nodes).length).toBeGreaterThan(md.length / 4);
  });

  test('nested list items still nest, up to the depth bound', () => {
    const nodes = toNodes('- - - x');
    expect(compact(nodes[0].children)).toBe('ul(li(ul(li(ul(li("x"))))))');
  });
});
