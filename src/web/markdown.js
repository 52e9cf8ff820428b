// confab's Markdown renderer for replies: text in, DOM nodes out. It only ever creates
// elements and text nodes (never innerHTML), so whatever a message holds — HTML, scripts,
// event attributes — shows as text; links go only to http(s) and mailto addresses and open
// in a new tab with rel="noopener noreferrer". What it knows: headings, paragraphs (single
// newlines kept as line breaks, as chat text means them), emphasis, strong, strikethrough,
// inline code, fenced code blocks (with a copy button), lists (nested, ordered, tight),
// block quotes, rules, pipe tables, links and bare URLs.
"use strict";

const Markdown = (() => {
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  const LIST = /^( {0,3})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
  const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}>/;
  const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

  function el(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }

  function link(href, parent) {
    const a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    parent.append(a);
    return a;
  }

  // ---------- inline ----------

  function inline(text, parent) {
    let buf = "";
    const flush = () => {
      if (buf) parent.append(document.createTextNode(buf));
      buf = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      const rest = text.slice(i);
      let m;
      if (c === "\\" && /^\\[\\`*_{}[\]()#+\-.!|~>]/.test(rest)) {
        buf += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "\n") {
        flush();
        parent.append(el("br"));
        i += 1;
        continue;
      }
      if (c === "`" && (m = /^(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.exec(rest))) {
        flush();
        const code = el("code");
        code.textContent = m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
        parent.append(code);
        i += m[0].length;
        continue;
      }
      if (c === "[" && (m = /^\[((?:[^\]\\]|\\.)*)\]\(\s*<?([^\s<>)]+)>?(?:\s+"[^"]*")?\s*\)/.exec(rest))) {
        flush();
        // An unsafe address (javascript:, data:, …) keeps only the link's text.
        inline(m[1], SAFE_URL.test(m[2]) ? link(m[2], parent) : parent);
        i += m[0].length;
        continue;
      }
      if (c === "h" && (i === 0 || /[\s(]/.test(text[i - 1])) && (m = /^https?:\/\/[^\s<>]*[^\s<>.,;:!?'")\]]/.exec(rest))) {
        flush();
        link(m[0], parent).textContent = m[0];
        i += m[0].length;
        continue;
      }
      // `_` inside a word (snake_case, __dunder__) is not emphasis.
      const inWord = c === "_" && i > 0 && /[\p{L}\p{N}_]/u.test(text[i - 1]);
      if ((c === "*" || c === "_" || c === "~") && rest.startsWith(c + c) && !inWord) {
        const end = text.indexOf(c + c, i + 2);
        const after = text[end + 2];
        const closes = c !== "_" || after === undefined || !/[\p{L}\p{N}]/u.test(after);
        if (end > i + 2 && closes && !/\s/.test(text[i + 2]) && !/\s/.test(text[end - 1])) {
          flush();
          inline(text.slice(i + 2, end), parent.appendChild(el(c === "~" ? "del" : "strong")));
          i = end + 2;
          continue;
        }
      }
      if (c === "*" || c === "_") {
        const re = c === "*" ? /^\*([^\s*](?:[^*]*[^\s*])?)\*/ : /^_([^\s_](?:[^_]*[^\s_])?)_(?![\p{L}\p{N}])/u;
        if (!inWord && (m = re.exec(rest))) {
          flush();
          inline(m[1], parent.appendChild(el("em")));
          i += m[0].length;
          continue;
        }
      }
      buf += c;
      i += 1;
    }
    flush();
  }

  // ---------- blocks ----------

  function codeBlock(code, lang) {
    const wrap = el("div", "code");
    const bar = el("div", "code-bar");
    const label = el("span", "lang");
    label.textContent = lang || "code";
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => {
      const done = (word) => {
        copy.textContent = word;
        setTimeout(() => (copy.textContent = "Copy"), 1500);
      };
      if (!navigator.clipboard) return done("Copy failed");
      navigator.clipboard.writeText(code).then(() => done("Copied"), () => done("Copy failed"));
    });
    bar.append(label, copy);
    const pre = el("pre");
    const c = el("code");
    if (lang) c.dataset.lang = lang;
    c.textContent = code;
    pre.append(c);
    wrap.append(bar, pre);
    return wrap;
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((x) => x.trim());
  }

  function isTable(lines, i) {
    return i + 1 < lines.length && lines[i].includes("|") && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-");
  }

  function table(lines, i, out) {
    const head = cells(lines[i]);
    const align = cells(lines[i + 1]).map((a) => (a.endsWith(":") ? (a.startsWith(":") ? "center" : "right") : a.startsWith(":") ? "left" : ""));
    const t = el("table");
    const tr = t.appendChild(el("thead")).appendChild(el("tr"));
    head.forEach((h, k) => {
      const th = tr.appendChild(el("th"));
      if (align[k]) th.style.textAlign = align[k];
      inline(h, th);
    });
    const body = t.appendChild(el("tbody"));
    i += 2;
    while (i < lines.length && lines[i].trim() !== "" && lines[i].includes("|")) {
      const row = body.appendChild(el("tr"));
      const cs = cells(lines[i]);
      head.forEach((_, k) => {
        const td = row.appendChild(el("td"));
        if (align[k]) td.style.textAlign = align[k];
        inline(cs[k] || "", td);
      });
      i += 1;
    }
    const wrap = el("div", "table");
    wrap.append(t);
    out.append(wrap);
    return i;
  }

  function startsBlock(lines, i) {
    const l = lines[i];
    return FENCE.test(l) || HEADING.test(l) || RULE.test(l) || QUOTE.test(l) || LIST.test(l) || isTable(lines, i);
  }

  function list(lines, i, out) {
    const first = LIST.exec(lines[i]);
    const ordered = /\d/.test(first[2]);
    const marker = first[2].slice(-1);
    const indent = first[1].length;
    const listEl = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) listEl.start = parseInt(first[2], 10);
    let loose = false;
    const items = [];
    while (i < lines.length) {
      const m = LIST.exec(lines[i]);
      if (!m || m[1].length > indent + 1 || m[2].slice(-1) !== marker || /\d/.test(m[2]) !== ordered) break;
      const width = m[1].length + m[2].length + 1;
      const body = [m[3] || ""];
      i += 1;
      while (i < lines.length) {
        const l = lines[i];
        if (l.trim() === "") {
          // A blank line inside an item continues it only when indented text follows.
          const next = lines[i + 1];
          if (next !== undefined && /^\s+\S/.test(next) && next.search(/\S/) >= width) {
            loose = true;
            body.push("");
            i += 1;
            continue;
          }
          break;
        }
        const lead = l.search(/\S/);
        if (lead >= width) body.push(l.slice(width));
        else if (LIST.test(l) && lead <= indent + 1) break;
        else if (lead >= 2 && LIST.test(l)) body.push(l.slice(Math.min(lead, width)));
        else if (!startsBlock(lines, i)) body.push(l.trim());
        else break;
        i += 1;
      }
      items.push(body.join("\n"));
      // A blank line between items makes the list loose (paragraphs in items).
      if (i < lines.length && lines[i].trim() === "" && LIST.test(lines[i + 1] || "")) {
        const n = LIST.exec(lines[i + 1]);
        if (n[1].length <= indent + 1 && n[2].slice(-1) === marker) {
          loose = true;
          i += 1;
        }
      }
    }
    for (const text of items) {
      const li = listEl.appendChild(el("li"));
      const content = render(text);
      // A tight item holds its text directly, not in a paragraph.
      if (!loose && content.firstChild && content.firstChild.tagName === "P") {
        const p = content.firstChild;
        content.removeChild(p);
        li.append(...p.childNodes);
      }
      li.append(content);
    }
    out.append(listEl);
    return i;
  }

  function render(src) {
    const out = document.createDocumentFragment();
    const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (line.trim() === "") {
        i += 1;
      } else if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i += 1;
        while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence (or the end of an unfinished block while streaming)
        out.append(codeBlock(body.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        inline(m[2] || "", out.appendChild(el("h" + m[1].length)));
        i += 1;
      } else if (RULE.test(line)) {
        out.append(el("hr"));
        i += 1;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && QUOTE.test(lines[i])) {
          body.push(lines[i].replace(/^ {0,3}> ?/, ""));
          i += 1;
        }
        out.appendChild(el("blockquote")).append(render(body.join("\n")));
      } else if (isTable(lines, i)) {
        i = table(lines, i, out);
      } else if (LIST.test(line) && (LIST.exec(line)[3] || "").trim() !== "") {
        i = list(lines, i, out);
      } else {
        const para = [line.trim()];
        i += 1;
        while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines, i)) {
          para.push(lines[i].trim());
          i += 1;
        }
        inline(para.join("\n"), out.appendChild(el("p")));
      }
    }
    return out;
  }

  return { render };
})();
