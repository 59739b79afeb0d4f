// Incremental rendering of a streaming answer, pure (no wx): the text so far is split into finished blocks and
// the open tail. A cut is made only before a line that starts at column 0 after a blank line, is not a list item,
// is complete (a newline follows it) and starts a top-level block: every block before it (paragraph, list,
// table, quote, closed fence) has then ended and looked at no later line than that one, and text is only ever
// appended, so the nodes before the cut never change. They are kept; each update parses only the text from the
// last cut on. The result is `blocks`: an array of rich-text node arrays (one rich-text each), the finished
// chunks then the tail; joined (`joinBlocks`) they are exactly `toNodes(text)` of the whole text, the
// 400 000-character fallback to plain text included. `update` also says which blocks changed, so the page sends
// only those with setData.

'use strict';

const { blocks: parseBlocks, plainNodes, el, LIST_ITEM, MAX_NODES_JSON } = require('./markdown');

// JSON length of [root with no children]; a root with n children adds their JSON and n - 1 commas
const EMPTY_ROOT_JSON = JSON.stringify([el('div', 'root', [])]).length;

function root(children) {
  return [el('div', 'root', children)];
}

// Blocks joined back into the nodes of the whole text.
function joinBlocks(blocks) {
  if (!blocks.length) return [];
  const children = [];
  blocks.forEach((b) => children.push(...b[0].children));
  return root(children);
}

class StreamRender {
  constructor() {
    this.reset();
  }

  reset() {
    this.prefix = ''; // the normalised text of the finished chunks
    this.chunks = []; // [root(children)] per finished chunk
    this.json = 0; // JSON length of the finished chunks' children, commas between them included
    this.count = 0; // how many children they have
    this.shown = []; // the blocks of the last update
    this.tailJson = null; // JSON of the last tail block
  }

  // Render `md` (the text so far; if it does not extend the last one, start again).
  // Returns { blocks, changed }: changed is the indexes of blocks new or different since the last update, or
  // null when the array itself changed shape (send all of it).
  update(md) {
    const raw = typeof md === 'string' ? md : '';
    const norm = raw.replace(/\r\n?/g, '\n');
    if (!norm.startsWith(this.prefix)) {
      const shown = this.shown;
      this.reset();
      this.shown = shown;
    }
    let next;
    if (!raw) {
      next = [];
    } else {
      const base = this.prefix.length;
      const lines = norm.slice(base).split('\n');
      const starts = [];
      const nodes = parseBlocks(lines, 0, starts);
      // the last safe cut: the index of the first tail node
      let cutNode = 0;
      let cutLine = 0;
      for (let s = starts.length - 1; s > 0; s--) {
        const L = starts[s];
        if (L < lines.length - 1 && !lines[L - 1].trim() && /^\S/.test(lines[L]) && !LIST_ITEM.test(lines[L])) {
          cutNode = s;
          cutLine = L;
          break;
        }
      }
      const sizes = nodes.map((n) => JSON.stringify(n));
      if (cutNode > 0) {
        const done = nodes.slice(0, cutNode);
        this.chunks.push(root(done));
        for (let k = 0; k < cutNode; k++) this.json += sizes[k].length;
        this.json += (this.count ? 1 : 0) + cutNode - 1;
        this.count += cutNode;
        let off = base;
        for (let k = 0; k < cutLine; k++) off += lines[k].length + 1;
        this.prefix = norm.slice(0, off);
      }
      const tail = nodes.slice(cutNode);
      let total = EMPTY_ROOT_JSON + this.json;
      const n = this.count + tail.length;
      for (let k = cutNode; k < nodes.length; k++) total += sizes[k].length;
      if (n > 1) total += (this.count && tail.length ? 1 : 0) + (tail.length ? tail.length - 1 : 0);
      if (total > MAX_NODES_JSON) {
        next = [plainNodes(raw)]; // what toNodes gives: the text as plain text, cut
      } else {
        next = this.chunks.slice();
        if (tail.length || !this.chunks.length) next.push(root(tail));
      }
    }
    return this._diff(next);
  }

  _diff(next) {
    const prev = this.shown;
    this.shown = next;
    const last = next.length ? JSON.stringify(next[next.length - 1]) : null;
    const prevLast = this.tailJson;
    this.tailJson = last;
    if (next.length < prev.length) return { blocks: next, changed: null };
    const changed = [];
    for (let k = 0; k < next.length; k++) {
      if (k >= prev.length || prev[k] !== next[k]) {
        // a new tail equal to the one shown is not sent again
        if (k === next.length - 1 && k === prev.length - 1 && last === prevLast) continue;
        changed.push(k);
      }
    }
    return { blocks: next, changed };
  }
}

module.exports = { StreamRender, joinBlocks };
