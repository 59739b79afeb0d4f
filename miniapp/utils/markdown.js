// Markdown -> `rich-text` nodes, pure (no wx, no DOM): what the message bubble renders.
//
// Safety: the output is a node array, never an HTML string, so no markup in the answer can become an element or
// an attribute. Node names come only from ALLOWED below, attributes are only `class` (and `style` for table
// alignment), and every text is entity-escaped (rich-text decodes entities in text nodes, so `&lt;` written by
// the model would otherwise show as `<`). Links are shown as text: `[label](url)` -> `label (url)`.
//
// Supported: paragraphs (a single newline is a line break), ATX headings, fenced code blocks (``` or ~~~; an
// unclosed fence while the answer streams runs to the end), indented code is not special, bullet and ordered
// lists with nesting by indentation, block quotes, horizontal rules, GitHub tables (with alignment), and inline
// code, **bold**, *italic*, ~~strike~~, links, and backslash escapes.

'use strict';

const ALLOWED = new Set(['div', 'p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'ul', 'ol', 'li', 'pre', 'code',
  'strong', 'em', 'del', 'span', 'br', 'hr', 'blockquote', 'table', 'thead', 'tbody', 'tr', 'th', 'td']);

function escapeText(s) {
  return String(s)
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&#39;');
}

function text(s) {
  return { type: 'text', text: escapeText(s) };
}

function el(name, cls, children, style) {
  if (!ALLOWED.has(name)) throw new Error('markdown: element not allowed: ' + name);
  const node = { name, attrs: { class: 'md-' + cls }, children: children || [] };
  if (style) node.attrs.style = style;
  return node;
}

// ---------------------------------------------------------------- inline

const MAX_INLINE = 10000; // a longer single line is shown as plain text (delimiter matching is quadratic)
const PUNCT_ESCAPABLE = '\\`*_{}[]()#+-.!|~<>';

// Index of the closing delimiter `delim` in `s` from `from`, skipping code spans and escapes; -1 if none.
function findClose(s, delim, from) {
  for (let i = from; i < s.length; i++) {
    const c = s[i];
    if (c === '\\') { i++; continue; }
    if (c === '`') {
      const end = s.indexOf('`', i + 1);
      if (end < 0) return -1;
      i = end;
      continue;
    }
    if (s.startsWith(delim, i)) {
      if (delim.length === 1 && s[i + 1] === delim) { i++; continue; } // `*` must not close on `**`
      return i;
    }
  }
  return -1;
}

function isWordChar(c) {
  return c !== undefined && /[A-Za-z0-9]/.test(c);
}

// Parse inline markdown into nodes (text nodes merged).
function inline(s, depth) {
  depth = depth || 0;
  const out = [];
  let buf = '';
  const flush = () => {
    if (buf) { out.push(text(buf)); buf = ''; }
  };
  if (depth > 8 || s.length > MAX_INLINE) return [text(s)]; // bounded work on pathological input
  // A delimiter not found from `from` is not found from further on either: remember it, so a run of openers
  // without a closer (`_a__a__a…`) scans the line once, not once per opener.
  const none = {};
  const close = (delim, from) => {
    if (none[delim] !== undefined && from >= none[delim]) return -1;
    const end = findClose(s, delim, from);
    if (end < 0) none[delim] = none[delim] === undefined ? from : Math.min(none[delim], from);
    return end;
  };
  let i = 0;
  while (i < s.length) {
    const c = s[i];
    if (c === '\\' && i + 1 < s.length && PUNCT_ESCAPABLE.includes(s[i + 1])) {
      buf += s[i + 1];
      i += 2;
      continue;
    }
    if (c === '`') {
      let n = 1;
      while (s[i + n] === '`') n++;
      const fence = '`'.repeat(n);
      const end = s.indexOf(fence, i + n);
      if (end > 0) {
        flush();
        out.push(el('code', 'code-inline', [text(s.slice(i + n, end).replace(/^ (.*) $/, '$1'))]));
        i = end + n;
        continue;
      }
      buf += fence;
      i += n;
      continue;
    }
    if (c === '[') {
      // the label holds no `[`: from each `[` the scan stops at the next one (else 10 000 `[` cost 10 000^2)
      const m = /^\[([^[\]\n]*)\]\(((?:[^()\s]|\([^()\s]*\))*)(?:\s+"[^"]*")?\)/.exec(s.slice(i));
      if (m) {
        flush();
        const label = inline(m[1], depth + 1);
        const url = m[2];
        const kids = label.slice();
        if (url && url !== m[1]) kids.push(text(' (' + url + ')'));
        out.push(el('span', 'link', kids));
        i += m[0].length;
        continue;
      }
    }
    if ((c === '*' || c === '_') && s[i + 1] === c && s[i + 2] !== undefined && s[i + 2] !== ' '
        && !(c === '_' && isWordChar(s[i - 1]))) { // checked before the scan: `__a` x 3 000 was quadratic
      const delim = c + c;
      const end = close(delim, i + 2);
      if (end > i + 2 && s[end - 1] !== ' ') {
        flush();
        out.push(el('strong', 'strong', inline(s.slice(i + 2, end), depth + 1)));
        i = end + 2;
        continue;
      }
    }
    if ((c === '*' || c === '_') && s[i + 1] !== undefined && s[i + 1] !== ' ' && s[i + 1] !== c
        && !(c === '_' && isWordChar(s[i - 1]))) {
      const end = close(c, i + 1);
      if (end > i + 1 && s[end - 1] !== ' ' && !(c === '_' && isWordChar(s[end + 1]))) {
        flush();
        out.push(el('em', 'em', inline(s.slice(i + 1, end), depth + 1)));
        i = end + 1;
        continue;
      }
    }
    if (c === '~' && s[i + 1] === '~') {
      const end = close('~~', i + 2);
      if (end > i + 2) {
        flush();
        out.push(el('del', 'del', inline(s.slice(i + 2, end), depth + 1)));
        i = end + 2;
        continue;
      }
    }
    buf += c;
    i++;
  }
  flush();
  return out;
}

// Lines of a paragraph: joined with line breaks (a chat answer's single newlines are meant).
function inlineLines(lines) {
  const out = [];
  lines.forEach((line, k) => {
    if (k > 0) out.push(el('br', 'br'));
    out.push(...inline(line.trim()));
  });
  return out;
}

// ---------------------------------------------------------------- blocks

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const HR = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

function indentOf(line) {
  let n = 0;
  for (const c of line) {
    if (c === ' ') n += 1;
    else if (c === '\t') n += 4;
    else break;
  }
  return n;
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
  const cells = [];
  let cur = '';
  let inCode = false;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === '\\' && s[i + 1] === '|') { cur += '|'; i++; continue; }
    if (c === '`') inCode = !inCode;
    if (c === '|' && !inCode) { cells.push(cur.trim()); cur = ''; continue; }
    cur += c;
  }
  cells.push(cur.trim());
  return cells;
}

function isTableStart(lines, i) {
  return i + 1 < lines.length && lines[i].includes('|') && TABLE_SEP.test(lines[i + 1])
    && splitRow(lines[i]).length <= MAX_COLUMNS
    && lines[i + 1].includes('-') && splitRow(lines[i]).length === splitRow(lines[i + 1]).length;
}

function table(lines, i) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) => {
    const l = c.startsWith(':'); const r = c.endsWith(':');
    return l && r ? 'center' : r ? 'right' : l ? 'left' : '';
  });
  const cell = (tag, content, k) => el(tag, tag, inline(content || ''), aligns[k] ? 'text-align:' + aligns[k] : '');
  const thead = el('thead', 'thead', [el('tr', 'tr', head.map((c, k) => cell('th', c, k)))]);
  const rows = [];
  let j = i + 2;
  while (j < lines.length && lines[j].trim() && lines[j].includes('|')
    && (rows.length + 2) * head.length <= MAX_TABLE_CELLS) {
    const cells = splitRow(lines[j]);
    rows.push(el('tr', 'tr', head.map((_, k) => cell('td', cells[k], k))));
    j++;
  }
  return { node: el('table', 'table', [thead, el('tbody', 'tbody', rows)]), next: j };
}

// A table is at most MAX_COLUMNS wide (a wider one is text) and MAX_TABLE_CELLS big (further rows are text):
// rows times header columns made a 6 KB answer 54 MB of nodes.
const MAX_COLUMNS = 64;
const MAX_TABLE_CELLS = 2000;

// A list starting at lines[i] (a list item line): the items at this indentation, nested lists inside.
// `marks`, if given (top level), gets [line, items before it] of every item after the first.
function list(lines, i, depth, marks) {
  const first = LIST_ITEM.exec(lines[i]);
  const base = indentOf(first[1]);
  const ordered = /\d/.test(first[2]);
  const items = [];
  let j = i;
  while (j < lines.length) {
    const m = LIST_ITEM.exec(lines[j]);
    if (!m || indentOf(m[1]) !== base || /\d/.test(m[2]) !== ordered) break;
    if (marks && j > i) marks.push([j, items.length]);
    // the item's own lines: its first line, continuation lines and deeper lines (nested blocks)
    const body = [m[3]];
    let k = j + 1;
    while (k < lines.length) {
      const line = lines[k];
      if (!line.trim()) {
        // a blank line ends the item unless more indented content follows
        if (k + 1 < lines.length && lines[k + 1].trim() && indentOf(lines[k + 1]) > base) { body.push(''); k++; continue; }
        break;
      }
      const sub = LIST_ITEM.exec(line);
      if (sub && indentOf(sub[1]) <= base) break;
      if (!sub && indentOf(line) <= base && (HEADING.test(line) || FENCE.test(line) || QUOTE.test(line)
          || HR.test(line) || line.includes('|'))) break;
      body.push(indentOf(line) > base ? line.slice(Math.min(indentOf(line), base + (m[2].length + 1))) : line.trim());
      k++;
    }
    items.push(el('li', 'li', itemContent(body, depth)));
    j = k;
    // a blank line between items of the same list keeps the list going
    if (j < lines.length && !lines[j].trim() && j + 1 < lines.length) {
      const nx = LIST_ITEM.exec(lines[j + 1]);
      if (nx && indentOf(nx[1]) === base && /\d/.test(nx[2]) === ordered) j++;
    }
  }
  const attrsStart = ordered ? parseInt(first[2], 10) : 1;
  const node = el(ordered ? 'ol' : 'ul', ordered ? 'ol' : 'ul', items);
  if (ordered && attrsStart !== 1) node.attrs.start = String(attrsStart);
  return { node, next: j };
}

// An item's lines: the leading text lines inline, the rest (nested lists, code) as blocks, one level deeper
// (the depth bound holds for `- - - … x`: a 10 KB line of them overflowed the stack).
function itemContent(body, depth) {
  let n = 0;
  while (n < body.length && body[n].trim() && !LIST_ITEM.test(body[n]) && !FENCE.test(body[n])) n++;
  const out = n ? inlineLines(body.slice(0, n)) : [];
  const rest = body.slice(n);
  if (rest.some((l) => l.trim())) out.push(...blocks(dedent(rest), depth + 1));
  return out;
}

function dedent(lines) {
  const ind = Math.min(...lines.filter((l) => l.trim()).map(indentOf));
  return lines.map((l) => (l.trim() ? l.slice(Math.min(ind, indentOf(l))) : ''));
}

// The blocks of lines: one node a block. At the top level only: `starts`, if given, gets the line index of each
// block, and `marks` the items of its lists after the first: [line, items before it, index of the list's node].
function blocks(lines, depth, starts, marks) {
  const out = [];
  let i = 0;
  if (depth > 12) return [el('p', 'p', inlineLines(lines.filter((l) => l.trim())))];
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    if (starts) starts.push(i);
    let m = FENCE.exec(line);
    if (m) {
      const fence = m[1];
      const lang = m[2];
      const body = [];
      let j = i + 1;
      const close = new RegExp('^ {0,3}' + fence[0] + '{' + fence.length + ',}\\s*$');
      while (j < lines.length && !close.test(lines[j])) body.push(lines[j++]);
      const kids = [el('code', 'code', [text(body.join('\n'))])];
      const pre = el('pre', 'pre', kids);
      out.push(lang ? el('div', 'codeblock', [el('div', 'lang', [text(lang)]), pre]) : pre);
      i = j + 1;
      continue;
    }
    m = HEADING.exec(line);
    if (m) {
      const level = m[1].length;
      out.push(el('h' + level, 'h' + level, inline(m[2] || '')));
      i++;
      continue;
    }
    if (HR.test(line)) {
      out.push(el('hr', 'hr'));
      i++;
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const own = marks ? [] : null;
      const r = list(lines, i, depth, own);
      if (own) own.forEach(([l, n]) => marks.push([l, n, out.length]));
      out.push(r.node);
      i = r.next;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() && (QUOTE.test(lines[i]) || body.length)) {
        const q = QUOTE.exec(lines[i]);
        body.push(q ? q[1] : lines[i]);
        i++;
      }
      out.push(el('blockquote', 'quote', blocks(body, depth + 1)));
      continue;
    }
    if (isTableStart(lines, i)) {
      const r = table(lines, i);
      out.push(r.node);
      i = r.next;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
      && !QUOTE.test(lines[i]) && !(para.length && LIST_ITEM.test(lines[i])) && !isTableStart(lines, i)
      && !(para.length && HR.test(lines[i]))) {
      para.push(lines[i]);
      i++;
    }
    out.push(el('p', 'p', inlineLines(para)));
  }
  return out;
}

// setData takes at most 1 MB per call (the page's and the bubble's own). Nodes whose JSON is larger than
// MAX_NODES_JSON (a long answer with many lines, lists or inline marks is 2-40 times its text) are replaced by
// the plain text in one block, itself cut after MAX_PLAIN characters of JSON, with a note; 复制 copies the
// whole answer.
const MAX_NODES_JSON = 400000;
const MAX_PLAIN = 300000;
const CUT_NOTE = '\n……（回答过长，此处只显示前一部分；点「复制」可复制全文）';

// The plain text is split into several `pre` nodes, each ending at the first line end after PLAIN_PIECE
// characters, so a streaming answer shown as plain text sends only its last piece again (utils/stream.js).
const PLAIN_PIECE = 8000;

function plainNodes(md) {
  let out = '';
  let size = 0; // of the text in JSON (control characters are 6 there)
  let i = 0;
  for (; i < md.length && size < MAX_PLAIN; i += 1000) {
    const part = escapeText(md.slice(i, i + 1000));
    out += part;
    size += JSON.stringify(part).length;
  }
  const pieces = [];
  for (let from = 0; from < out.length;) {
    const nl = out.indexOf('\n', from + PLAIN_PIECE - 1);
    const end = nl < 0 ? out.length : nl + 1;
    pieces.push(out.slice(from, end));
    from = end;
  }
  if (!pieces.length) pieces.push('');
  if (i < md.length) pieces[pieces.length - 1] += escapeText(CUT_NOTE);
  return [el('div', 'root', pieces.map((t) => el('pre', 'plain', [{ type: 'text', text: t }])))];
}

// The rich-text nodes of a markdown text.
function toNodes(md) {
  if (typeof md !== 'string' || !md) return [];
  const lines = md.replace(/\r\n?/g, '\n').split('\n');
  const nodes = [el('div', 'root', blocks(lines, 0))];
  return JSON.stringify(nodes).length <= MAX_NODES_JSON ? nodes : plainNodes(md);
}

// The plain text of nodes (tests, accessibility): entities decoded back.
function plainText(nodes) {
  let s = '';
  const walk = (ns) => ns.forEach((n) => {
    if (n.type === 'text') s += n.text;
    else { if (n.name === 'br') s += '\n'; walk(n.children || []); }
  });
  walk(nodes);
  return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&#39;/g, "'")
    .replace(/&amp;/g, '&');
}

module.exports = { toNodes, inline, escapeText, plainText, ALLOWED, MAX_NODES_JSON,
  // for utils/stream.js (incremental rendering of a streaming answer)
  blocks, plainNodes, el, LIST_ITEM, HR };
