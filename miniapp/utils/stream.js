// Incremental rendering of a streaming answer, pure (no wx): the text so far is split into finished chunks and the
// open tail, and the chunks' nodes are kept; each update parses only the text after the last cut. Text is only
// ever appended, so a cut is made only where the nodes before it can no longer change:
//   - before a complete line (a newline follows it) that starts a top-level block, starts at column 0, follows a
//     blank line and is no list item: every block before it (paragraph, list, table, quote, closed fence) has
//     ended and has looked at no later line than that one;
//   - before a complete line that starts an item (not the first) of a top-level list and is no rule (`- - -`):
//     the items before it are finished; the list goes on in the next chunk (its first node "continues" the last
//     node of the chunk before: joined, their items are one list; shown, an ordered one numbers on).
// `blocks` is an array of rich-text node arrays (one rich-text each): the finished chunks then the tail. Joined
// (`joinBlocks(blocks, cont)`) they are exactly `toNodes(text)` of the whole text, the 400 000-character fallback
// to plain text included. `update` also says which blocks changed, so the page sends only those with setData.

'use strict';

const { blocks: parseBlocks, plainNodes, el, LIST_ITEM, HR, MAX_NODES_JSON } = require('./markdown');

// JSON length of [root with no children]; each child adds its JSON and a comma, less one comma in all
const EMPTY_ROOT_JSON = JSON.stringify([el('div', 'root', [])]).length;

function root(children) {
  return [el('div', 'root', children)];
}

// A node with some of its children (a list cut between items): attrs copied, never shared.
function part(node, from, to) {
  return { name: node.name, attrs: Object.assign({}, node.attrs), children: node.children.slice(from, to) };
}

// What a node adds to the JSON of the whole root: a continuing list adds only its items (and a comma).
function contrib(json, node, continues) {
  if (!continues) return json.length + 1;
  return json.length - JSON.stringify(part(node, 0, 0)).length + 1;
}

function listStart(node) {
  return node.name === 'ol' ? parseInt(node.attrs.start || '1', 10) : 1;
}

// Blocks joined back into the nodes of the whole text; cont[k]: block k's first node continues the last before.
function joinBlocks(blocks, cont) {
  if (!blocks.length) return [];
  const children = [];
  blocks.forEach((b, k) => {
    const kids = b[0].children;
    if (cont && cont[k] && children.length && kids.length) {
      const last = children[children.length - 1];
      children[children.length - 1] = { name: last.name, attrs: last.attrs,
        children: last.children.concat(kids[0].children) };
      children.push(...kids.slice(1));
    } else {
      children.push(...kids);
    }
  });
  return root(children);
}

class StreamRender {
  constructor() {
    this.reset();
  }

  reset() {
    this.prefix = ''; // the normalised text of the finished chunks
    this.chunks = []; // [root(children)] per finished chunk
    this.chunkCont = []; // per chunk: its first node continues the last node before
    this.json = 0; // what the chunks' nodes add to the JSON of the whole root
    this.real = 0; // how many of them are root children (not continuations)
    this.cont = false; // the tail's first node continues a list of the last chunk
    this.contStart = 1; // and numbers on from here (an ordered list)
    this.shown = []; // the blocks of the last update
    this.shownJson = []; // their JSON where known
  }

  // Render `md` (the text so far; if it does not extend the last one, start again).
  // Returns { blocks, cont, changed }: changed is the indexes of blocks new or different since the last update,
  // or null when the array got shorter (send all of it).
  update(md) {
    const raw = typeof md === 'string' ? md : '';
    const norm = raw.replace(/\r\n?/g, '\n');
    if (!norm.startsWith(this.prefix)) {
      const { shown, shownJson } = this;
      this.reset();
      this.shown = shown;
      this.shownJson = shownJson;
    }
    let next;
    let cont;
    if (!raw) {
      next = [];
      cont = [];
    } else {
      const base = this.prefix.length;
      const lines = norm.slice(base).split('\n');
      const starts = [];
      const marks = [];
      let nodes = parseBlocks(lines, 0, starts, marks);
      if (this.cont && nodes.length && nodes[0].name === 'ol') nodes[0].attrs.start = String(this.contStart);
      // the last safe cut
      let best = null;
      for (let s = 1; s < starts.length; s++) {
        const L = starts[s];
        if (L < lines.length - 1 && !lines[L - 1].trim() && /^\S/.test(lines[L]) && !LIST_ITEM.test(lines[L])) {
          if (!best || L > best.L) best = { L, s, m: null };
        }
      }
      for (const [L, m, s] of marks) {
        if (L < lines.length - 1 && !HR.test(lines[L]) && (!best || L > best.L)) best = { L, s, m };
      }
      if (best) {
        const done = nodes.slice(0, best.s);
        let rest = nodes.slice(best.s);
        if (best.m !== null) {
          const list = nodes[best.s];
          done.push(part(list, 0, best.m));
          const go = part(list, best.m);
          if (go.name === 'ol') go.attrs.start = String(listStart(list) + best.m);
          rest = [go].concat(nodes.slice(best.s + 1));
        }
        done.forEach((n, k) => {
          const continues = k === 0 && this.cont;
          this.json += contrib(JSON.stringify(n), n, continues);
          if (!continues) this.real++;
        });
        this.chunks.push(root(done));
        this.chunkCont.push(this.cont);
        this.cont = best.m !== null;
        if (this.cont) this.contStart = parseInt(rest[0].attrs.start || '1', 10);
        let off = base;
        for (let k = 0; k < best.L; k++) off += lines[k].length + 1;
        this.prefix = norm.slice(0, off);
        nodes = rest;
      }
      let total = EMPTY_ROOT_JSON + this.json;
      let real = this.real;
      nodes.forEach((n, k) => {
        const continues = k === 0 && this.cont;
        total += contrib(JSON.stringify(n), n, continues);
        if (!continues) real++;
      });
      if (real) total -= 1;
      if (total > MAX_NODES_JSON) {
        // what toNodes gives: the text as plain text (cut), a rich-text for each of its pieces
        next = plainNodes(raw)[0].children.map((pre) => root([pre]));
        cont = next.map(() => false);
      } else {
        next = this.chunks.slice();
        cont = this.chunkCont.slice();
        if (nodes.length || !this.chunks.length) {
          next.push(root(nodes));
          cont.push(this.cont);
        }
      }
    }
    return Object.assign(this._diff(next), { cont });
  }

  // Which blocks differ from the ones shown: the same object, or the same JSON, is not sent again.
  _diff(next) {
    const prev = this.shown;
    const prevJson = this.shownJson;
    this.shown = next;
    this.shownJson = next.map((b, k) => (k < prev.length && prev[k] === b ? prevJson[k] : null));
    if (next.length < prev.length) {
      this.shownJson = next.map((b) => JSON.stringify(b));
      return { blocks: next, changed: null };
    }
    const changed = [];
    for (let k = 0; k < next.length; k++) {
      if (k < prev.length && prev[k] === next[k]) continue;
      const json = JSON.stringify(next[k]);
      this.shownJson[k] = json;
      if (k < prev.length && prevJson[k] === json) continue;
      changed.push(k);
    }
    return { blocks: next, changed };
  }
}

module.exports = { StreamRender, joinBlocks };
