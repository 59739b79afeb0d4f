// A small Markdown renderer for the chat page: paragraphs, headings, lists (nested), fenced code, inline
// code, bold/italic/strikethrough, tables, block quotes, rules and http(s) links.
//
// Safety: the output is an HTML string in which every piece of the input went through esc(); the only
// markup added is a fixed set of tags, and the only attributes are href (http/https only, escaped),
// rel/target on links, class (fixed names) and start on <ol> (digits). Nothing else of the input can
// become markup. The regular expressions are bounded (no quadratic scans on hostile input), nesting is
// limited to MAX_DEPTH and a table to MAX_COLUMNS and MAX_TABLE_CELLS, so a long or odd answer cannot hang the
// page (the history shows it again on every load). Bidi override characters are dropped (no reversed link text).
(function (global) {
  "use strict";

  const MAX_DEPTH = 12;
  const MAX_COLUMNS = 64;        // a wider "table" is text: a short line must not become thousands of cells
  const MAX_TABLE_CELLS = 10000; // rows past this many cells are text (rows x columns from a few KB is millions)
  const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
  function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ESC[c]); }

  // ---- inline ----------------------------------------------------------------------------------
  const CODE_SPAN = /(`{1,3})(?!`)([^\n]{0,500}?[^`\n])\1(?!`)/g;
  const LINK = /\[([^\[\]\n]{1,500})\]\(\s*<?(https?:\/\/[^\s()<>]{1,2000})>?(?:\s+"[^"\n]{0,200}")?\s*\)/g;
  const AUTOLINK = /\bhttps?:\/\/[A-Za-z0-9\-._~:/?#\[\]@!$&'*+,;=%]{1,2000}/g;
  const SLOT = /\u0000(\d+)\u0000/g;
  const ESCAPED = /\\([\\`*_~\[\]()#|>!-])/g;

  function anchor(url, html) {
    return '<a href="' + esc(url) + '" rel="noopener noreferrer" target="_blank">' + html + "</a>";
  }

  function inline(src, inLink) {
    const slots = [], raws = [];  // a slot's HTML, and the source text it stands for (a URL takes that back)
    const put = (html, raw) => { raws.push(raw); return "\u0000" + (slots.push(html) - 1) + "\u0000"; };
    const unslot = (t) => t.replace(SLOT, (m, i) => raws[+i]);
    let s = String(src).replace(/[\u0000\u202a-\u202e\u2066-\u2069]/g, "");  // NUL; bidi overrides (spoofing)
    s = s.replace(ESCAPED, (m, c) => put(esc(c), m));  // backslash escapes
    s = s.replace(CODE_SPAN, (m, ticks, code) => put("<code>" + esc(code.replace(/^ (.*) $/, "$1")) + "</code>", m));
    if (!inLink) s = s.replace(LINK, (m, label, url) => put(anchor(unslot(url).replace(ESCAPED, "$1"),
                                                              inline(unslot(label), true)), m));
    if (!inLink) s = s.replace(AUTOLINK, (m) => {
      const url = m.replace(/[.,;:!?'*)\]]+$/, "");
      return put(anchor(url, esc(url)), url) + esc(m.slice(url.length));
    });
    s = esc(s);
    // Emphasis on escaped text: the content never holds "<" (no tag can be split), and its length is bounded.
    s = s.replace(/\*\*(?=\S)([^<]{0,400}?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([^<]{0,400}?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/\*(?=[^\s*])([^<*]{0,400}?[^\s*])\*/g, "<em>$1</em>");
    s = s.replace(/\*(?=[^\s*])([^<*\n])\*/g, "<em>$1</em>");
    s = s.replace(/(^|[^\w])_(?=[^\s_])([^<_]{0,400}?[^\s_]|[^\s_])_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~(?=\S)([^<~]{0,400}?\S)~~/g, "<del>$1</del>");
    s = s.replace(/\n/g, "<br>");
    return s.replace(SLOT, (m, i) => slots[+i]);
  }

  // ---- blocks ----------------------------------------------------------------------------------
  // (No two unbounded quantifiers that can match the same characters in a row: V8 backtracks.)
  const FENCE = /^ {0,3}(`{3,}|~{3,})([^`]*)$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]|$)/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
  const TABLE_SEP = /^[ \t|:-]+$/;
  const blank = (line) => /^\s*$/.test(line);

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    const cells = [];
    let cur = "", code = false;
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c === "\\" && s[i + 1] === "|") { cur += "|"; i++; continue; }
      if (c === "`") code = !code;
      if (c === "|" && !code) { cells.push(cur.trim()); cur = ""; continue; }
      cur += c;
    }
    cells.push(cur.trim());
    return cells;
  }

  function isTableStart(lines, i) {
    return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("|")
      && lines[i + 1].includes("-") && TABLE_SEP.test(lines[i + 1]) && !/-[ \t]+-/.test(lines[i + 1])
      && splitRow(lines[i]).length <= MAX_COLUMNS;
  }

  function startsBlock(lines, i) {
    const line = lines[i];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || isTableStart(lines, i)
      || (ITEM.test(line) && /^\s*([-*+]|1[.)])\s+\S/.test(line));
  }

  function table(lines, i, depth) {
    const head = splitRow(lines[i]);
    const align = splitRow(lines[i + 1]).map((c) => {
      const l = c.startsWith(":"), r = c.endsWith(":");
      return l && r ? ' class="al-c"' : r ? ' class="al-r"' : l ? ' class="al-l"' : "";
    });
    const cell = (tag, text, k) => "<" + tag + (align[k] || "") + ">" + inline(text) + "</" + tag + ">";
    let html = '<div class="table"><table><thead><tr>' + head.map((c, k) => cell("th", c, k)).join("") + "</tr></thead>";
    let j = i + 2;
    const rows = [];
    while (j < lines.length && !blank(lines[j]) && lines[j].includes("|")
           && (rows.length + 2) * head.length <= MAX_TABLE_CELLS) {
      const cells = splitRow(lines[j]);
      const row = [];
      for (let k = 0; k < head.length; k++) row.push(cell("td", cells[k] || "", k));
      rows.push("<tr>" + row.join("") + "</tr>");
      j++;
    }
    if (rows.length) html += "<tbody>" + rows.join("") + "</tbody>";
    return [html + "</table></div>", j];
  }

  function list(lines, i, depth) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = [];
    let cur = null, j = i, loose = false, lastBlank = false;
    while (j < lines.length) {
      const line = lines[j];
      const m = ITEM.exec(line);
      if (m && m[1].length <= indent + 1 && m[1].length + 1 >= indent && /\d/.test(m[2]) === ordered) {
        if (cur && lastBlank) loose = true;
        cur = {lines: [m[3] || ""], width: m[1].length + m[2].length + 1};
        items.push(cur);
        lastBlank = false;
        j++;
        continue;
      }
      if (blank(line)) {
        // a blank line continues the list only if an indented line or another item follows
        let k = j + 1;
        while (k < lines.length && blank(lines[k])) k++;
        if (k >= lines.length) break;
        const next = lines[k], nm = ITEM.exec(next);
        const nIndent = next.length - next.trimStart().length;
        if (nIndent > indent || (nm && nm[1].length <= indent + 1 && /\d/.test(nm[2]) === ordered)) {
          for (; j < k; j++) cur.lines.push("");  // all the blank lines at once: no rescan from each of them
          lastBlank = true;
          continue;
        }
        break;
      }
      const lineIndent = line.length - line.trimStart().length;
      if (lineIndent > indent) {  // a continuation or a nested block
        if (lastBlank) loose = true;
        cur.lines.push(line.slice(Math.min(lineIndent, cur.width)));
        lastBlank = false;
        j++;
        continue;
      }
      if (!lastBlank && !startsBlock(lines, j)) {  // lazy continuation of the item's paragraph
        cur.lines.push(line.trim());
        j++;
        continue;
      }
      break;
    }
    const start = ordered ? parseInt(first[2], 10) : 1;
    const open = ordered ? (start !== 1 ? '<ol start="' + start + '">' : "<ol>") : "<ul>";
    const body = items.map((it) => "<li>" + blocks(it.lines, depth + 1, !loose) + "</li>").join("");
    return [open + body + (ordered ? "</ol>" : "</ul>"), j];
  }

  // lines -> HTML. tight: paragraphs without <p> (the items of a tight list).
  function blocks(lines, depth, tight) {
    if (depth > MAX_DEPTH) return "<p>" + esc(lines.join("\n")).replace(/\n/g, "<br>") + "</p>";
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (blank(line)) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const mark = m[1], lang = m[2].trim().split(/\s/)[0].replace(/[^\w+#.-]/g, "").slice(0, 32);
        const body = [];
        i++;
        while (i < lines.length) {
          const t = lines[i].trim();
          if (t.length >= mark.length && t[0] === mark[0] && t === mark[0].repeat(t.length)) { i++; break; }
          body.push(lines[i]);
          i++;
        }
        out.push("<pre><code" + (lang ? ' class="lang-' + esc(lang) + '"' : "") + ">" + esc(body.join("\n"))
                 + "</code></pre>");
        continue;
      }
      if ((m = HEADING.exec(line))) {
        const n = m[1].length;
        let text = line.slice(m[0].length).trim();
        const closing = text.length - text.replace(/#+$/, "").length;  // "## title ##"
        if (closing && (closing === text.length || /\s/.test(text[text.length - closing - 1]))) {
          text = text.slice(0, text.length - closing).trim();
        }
        out.push("<h" + n + ">" + inline(text) + "</h" + n + ">");
        i++;
        continue;
      }
      if (RULE.test(line)) { out.push("<hr>"); i++; continue; }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && !blank(lines[i])) {
          const q = QUOTE.exec(lines[i]);
          if (q) inner.push(q[1]);
          else if (inner.length && !startsBlock(lines, i)) inner.push(lines[i]);  // lazy continuation
          else break;
          i++;
        }
        out.push("<blockquote>" + blocks(inner, depth + 1, false) + "</blockquote>");
        continue;
      }
      if (isTableStart(lines, i)) {
        const [html, next] = table(lines, i, depth);
        out.push(html);
        i = next;
        continue;
      }
      if (ITEM.test(line)) {
        const [html, next] = list(lines, i, depth);
        out.push(html);
        i = next;
        continue;
      }
      const para = [line.trim()];
      i++;
      while (i < lines.length && !blank(lines[i]) && !startsBlock(lines, i)) para.push(lines[i++].trim());
      out.push(tight ? inline(para.join("\n")) : "<p>" + inline(para.join("\n")) + "</p>");
    }
    return out.join(tight ? "" : "\n");
  }

  function render(text) {
    return blocks(String(text || "").replace(/\r\n?/g, "\n").split("\n"), 0, false);
  }

  // The last offset >= from (itself such an offset, or 0) where text splits into two parts that render to what
  // the whole renders to: the start of a complete line after a blank line, outside any fenced block, not
  // indented and not a list item (so no list, quote, table or paragraph goes on across it). A streaming answer
  // renders its text up to the cut once and only the rest again as more arrives.
  function safeCut(text, from) {
    let cut = from, fence = null, prevBlank = false;
    for (let i = from; i < text.length;) {
      const nl = text.indexOf("\n", i);
      if (nl < 0) break;  // the last line may still grow
      const line = text.slice(i, nl);
      if (fence) {
        const t = line.trim();
        if (t.length >= fence.length && t[0] === fence[0] && t === fence[0].repeat(t.length)) fence = null;
        prevBlank = false;
      } else {
        if (prevBlank && /^\S/.test(line) && !ITEM.test(line)) cut = i;
        const m = FENCE.exec(line);
        if (m) fence = m[1];
        prevBlank = blank(line);
      }
      i = nl + 1;
    }
    return cut;
  }

  global.ClawMarkdown = {render, safeCut, escape: esc, inline};
})(window);
